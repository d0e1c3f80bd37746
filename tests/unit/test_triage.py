"""Triage on checkpoints made the way the community trainer makes them (tests/fixtures/community_run.py, tiny model):
runs with the hooks and AdamW's default weight decay (fixed: base rows shrunk by decay alone), the run before the
hooks (broken), one resumed with the hooks later, fp16 with a GradScaler, today's latest.pth, pruned exports, the
WebUI's flags, and files that must never be loaded. The guide's own thresholds (5k / 20k / 50k) apply: the
generator fast-forwards tens of thousands of steps with AdamW's arithmetic."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from fidel_tts.trainer.checkpoints.triage import Reference, TriagePolicy, triage_path
from fidel_tts.trainer.model.weights import torch_load

from tests.fixtures.community_run import Project, TrainerFlags, community_run, prune_export

FP16 = TrainerFlags(amp="float16")
WEBUI = TrainerFlags(learning_rate=5e-5, weight_decay=1e-5, warmup_steps=4000, amp="float16")


@pytest.fixture(scope="module")
def runs(tiny_project_template, tmp_path_factory):
    p = tiny_project_template
    root = tmp_path_factory.mktemp("triage")
    project = Project(p.base_checkpoint, p.base_config, p.tokenizer, p.train_manifest)
    made = {
        "fixed 25k": community_run(project, root / "fixed", 25000)[-1],
        "fixed 52k": community_run(project, root / "fixed52k", 52000)[-1],
        "fixed 4k": community_run(project, root / "fixed4k", 4000)[-1],
        "fixed fp16 25k": community_run(project, root / "fp16", 25000, FP16, real_steps=20)[-1],
        "broken 38k": community_run(project, root / "broken", 38000, version="cf31c91")[-1],
        "fixed wd 0 25k": community_run(project, root / "wd0", 25000, TrainerFlags(weight_decay=0.0))[-1],
        "WebUI flags 25k": community_run(project, root / "webui", 25000, WEBUI, real_steps=20)[-1],
    }
    made["other vocabulary"] = made["fixed 4k"]  # judged against the base tokenizer: 91 rows wanted, 211 found
    made["latest.pth 25k"] = root / "fixed" / "latest.pth"
    made["broken, resumed with hooks 43k"] = community_run(project, root / "resumed", 43000,
                                                           resume=root / "broken" / "latest.pth")[-1]
    made["pruned fp16"] = prune_export(made["fixed 25k"], root / "pruned_fp16.pth", "float16")
    made["pruned fp32"] = prune_export(made["fixed 25k"], root / "pruned_fp32.pth", "float32")
    truncated = root / "model_step9000.pth"
    data = made["fixed 4k"].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    made["truncated"] = truncated
    return {"project": p, "root": root, "made": made, "ref": Reference.load(p.base_checkpoint, p.tokenizer),
            "base tokenizer": Reference.load(p.base_checkpoint, p.base_tokenizer)}


def judge(path, runs, policy=None, ref="ref"):
    decision = triage_path(path, ref=runs[ref], policy=policy)
    return decision, decision.candidates[0]


# scenario → (decision, finding, words of the evidence line or reason); the guide's answer in the comment
SCENARIOS = {
    "fixed 25k": ("resume", "fixed", "shrunk by weight decay alone"),  # resume
    "fixed 52k": ("resume", "fixed", "definitely resume"),  # definitely resume
    "fixed fp16 25k": ("resume", "fixed", "shrunk by weight decay alone"),  # resume
    "latest.pth 25k": ("resume", "fixed", "shrunk by weight decay alone"),  # resume
    "pruned fp16": ("fresh", "weights-only", "not a resumable run"),  # no training state: nothing to resume
    "pruned fp32": ("fresh", "weights-only", "not a resumable run"),  # no training state
    "fixed 4k": ("fresh", "fixed", "maybe restart"),  # maybe restart
    "broken 38k": ("fresh", "broken", "trained without the fix"),  # don't resume: start fresh
    "truncated": ("refuse", "corrupt", "truncated"),  # (nothing usable)
    "other vocabulary": ("refuse", "incompatible", "N+1"),  # (a different model)
    "broken, resumed with hooks 43k": ("fresh", "broken", "Option B check fails"),  # text loss ≥ 3.0: abort
    "fixed wd 0 25k": ("resume", "fixed", "bit-identical"),  # resume
    "WebUI flags 25k": ("resume", "fixed", "bit-identical"),  # resume
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_decision_agrees_with_the_guide(runs, name):
    action, finding, words = SCENARIOS[name]
    decision, c = judge(runs["made"][name], runs, ref="base tokenizer" if name == "other vocabulary" else "ref")
    assert (decision.action, c.finding) == (action, finding), c.detail
    assert words in c.detail + decision.reason


def test_experimental_policy_leaves_a_fixed_run_alone(runs):
    decision, c = judge(runs["made"]["fixed 25k"], runs, TriagePolicy("experimental"))
    assert decision.action == "resume" and c.finding == "fixed"
    broken, _ = judge(runs["made"]["broken 38k"], runs, TriagePolicy("experimental"))
    assert broken.action == "experimental" and "text-loss gate" in broken.reason


def test_decay_evidence_is_measured_against_the_recorded_lr_wd_and_steps(runs):
    _, c = judge(runs["made"]["fixed 25k"], runs)
    change, moments = c.evidence["change"]["text_embedding.weight"], c.evidence["moments"]
    assert moments["any_base_moments"] is False and moments["lr_peak"] == 2e-5 and moments["weight_decay"] == 0.01
    assert moments["base_rows"]["text_embedding.weight"]["adam_steps"] == 25000
    # cosine from 2e-5 over 25k steps at wd 0.01: about 0.26 % less, never more than (fl(1 − lr·wd)(1 − 2⁻²⁴))ⁿ
    assert change["decay_floor"] < change["ratio_min"] < change["ratio_median"] < change["ratio_max"] < 1
    assert 0.9970 < change["ratio_median"] < 0.9980 and change["within_decay"]
    _, fp16 = judge(runs["made"]["fixed fp16 25k"], runs)  # the scaler skipped steps: no decay on those
    assert fp16.evidence["moments"]["base_rows"]["text_embedding.weight"]["adam_steps"] < 25000
    assert fp16.evidence["step"] == 25000


def test_small_lr_drops_one_ulp_per_step(tiny_project_template, tmp_path, runs):
    """At lr 5e-6, wd 0.01 fp32 rounds 1 − lr·wd to 1 − 2⁻²⁴: every element loses one ulp per AdamW step."""
    p = tiny_project_template
    project = Project(p.base_checkpoint, p.base_config, p.tokenizer, p.train_manifest)
    flags = TrainerFlags(learning_rate=5e-6, warmup_steps=0, total_steps=10**9, save_interval=50)  # lr ≈ 5e-6
    path = community_run(project, tmp_path, 50, flags)[-1]
    b = runs["ref"].base_rows
    now = torch_load(path)["model"]["text_embedding.weight"][:b]
    base = runs["ref"].base["text_embedding.weight"][:b]
    ulps = base.view(torch.int32) - now.view(torch.int32)  # same sign: the int32 views differ by the ulps lost
    nonzero = base != 0
    assert int(ulps[nonzero].min()) == int(ulps[nonzero].max()) == 50
    decision, c = judge(path, runs)
    assert c.finding == "fixed" and c.evidence["base_change"] == "decay"


def test_change_decay_cannot_explain_is_gradient_drift(runs, tmp_path):
    raw = torch_load(runs["made"]["fixed 25k"])
    for name, edit in {"grew": lambda t: t[0, 0].mul_(1.01), "shrank too much": lambda t: t[1].mul_(0.9)}.items():
        model = {k: v.clone() for k, v in raw["model"].items()}
        edit(model["text_embedding.weight"])
        path = tmp_path / f"{name}.pth"
        torch.save({**raw, "model": model}, path)
        decision, c = judge(path, runs)
        assert decision.action == "fresh" and c.finding == "broken", name
        assert c.evidence["moments"]["any_base_moments"] is False  # the moments alone would have said "fixed"


def test_fast_forward_decay_is_the_optimizer_step_bit_for_bit(tiny_project_template, tmp_path, runs):
    """Base rows under the hooks: 12 real AdamW steps and 3 real + 9 fast-forwarded give the same bits."""
    p = tiny_project_template
    project = Project(p.base_checkpoint, p.base_config, p.tokenizer, p.train_manifest)
    flags = TrainerFlags(learning_rate=1e-3, weight_decay=0.1, warmup_steps=2, save_interval=12)
    real = torch_load(community_run(project, tmp_path / "real", 12, flags, real_steps=12)[-1])
    fast = torch_load(community_run(project, tmp_path / "fast", 12, flags, real_steps=3)[-1])
    b = runs["ref"].base_rows
    for key in ("text_embedding.weight", "text_head.weight", "text_head.bias"):
        assert torch.equal(real["model"][key][:b], fast["model"][key][:b]), key
        assert not torch.equal(real["model"][key][:b], runs["ref"].base[key][:b])  # decay did move them
    assert real["optimizer"]["state"][0]["step"] == fast["optimizer"]["state"][0]["step"] == 12


def test_community_output_dir_uses_its_most_advanced_training_checkpoint(runs):
    folder = runs["made"]["fixed 25k"].parent
    shutil.copy(runs["made"]["pruned fp16"], folder / "gpt_pruned.pth")
    shutil.copy(runs["made"]["truncated"], folder / "model_step9000.pth")
    decision = triage_path(folder, ref=runs["ref"])
    assert decision.action == "resume" and Path(decision.checkpoint).name in ("latest.pth", "model_step25000.pth")
    findings = sorted((Path(c.path).name, c.finding) for c in decision.candidates)
    assert ("gpt_pruned.pth", "weights-only") in findings and ("model_step9000.pth", "corrupt") in findings
    assert ("model_step23000.pth", "fixed") in findings  # rotation kept the last three (--keep-checkpoints 3)


def test_latest_pth_loads_with_its_torch_version_and_numpy_rng(runs):
    raw = torch_load(runs["made"]["latest.pth 25k"])
    assert type(raw["pytorch_version"]).__name__ == "TorchVersion" and raw["rng_state"]["numpy"][0] == "MT19937"
    assert {"manifests", "batch_size", "grad_accumulation", "cuda_peak_memory"} <= set(raw)


@pytest.mark.slow
def test_fidel_checkpoints_young_and_old_resume_with_lineage(runs, make_train_config, tmp_path):
    from fidel_tts.trainer.training.trainer import train

    p = runs["project"]
    tc = make_train_config(p, tmp_path / "fidel", max_steps=6, save_interval=1, keep_last=10, val_interval=3)
    train(tc)
    for step in (1, 6):
        path = tmp_path / "fidel" / f"ckpt-step{step:08d}.pt"
        decision, c = judge(path, runs)
        assert decision.action == "resume" and c.kind == "fidel" and c.step == step
        assert c.evidence["lineage_id"] and c.evidence["new_rows"]["new_rows_moved"] > 0
    decision = triage_path(tmp_path / "fidel", ref=runs["ref"])
    assert decision.action == "resume" and decision.checkpoint.endswith("ckpt-step00000006.pt")
    other = Reference.load(p.base_checkpoint)  # same base, but another tokenizer hash
    other = replace(other, tokenizer_sha256="0" * 64)
    assert triage_path(tmp_path / "fidel", ref=other).action == "refuse"


def test_corrupt_files_are_quarantined_never_loaded(runs, tmp_path):
    for seed in range(4):  # random bytes break the unpickler in different ways
        noise = tmp_path / f"noise{seed}.pth"
        noise.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(seed),
                                        dtype=torch.uint8).numpy().tobytes())
        decision, c = judge(noise, runs)
        assert decision.action == "refuse" and decision.refusal == "quarantine" and c.finding == "corrupt", c.detail
    flipped = tmp_path / "flipped.pth"
    shutil.copy(runs["made"]["fixed 4k"], flipped)
    (tmp_path / "flipped.pth.sha256").write_text("f" * 64 + "  flipped.pth\n")
    decision, c = judge(flipped, runs)
    assert c.finding == "corrupt" and "sha256" in c.detail


def test_other_config_is_incompatible(runs, tmp_path):
    raw = torch.load(runs["made"]["fixed 4k"], weights_only=True)
    wide = dict(raw, model={**raw["model"], "mel_head.weight": torch.zeros(3, 3)})
    torch.save(wide, tmp_path / "config.pth")
    decision, c = judge(tmp_path / "config.pth", runs)
    assert decision.refusal == "refuse" and c.finding == "incompatible" and "mel_head.weight" in c.detail


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(runs, tmp_path):
    marker = tmp_path / "owned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "step": Payload(marker)}, path)
    decision, c = judge(path, runs)
    assert decision.refusal == "hostile" and c.finding == "hostile" and not marker.exists()
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps(Payload(marker)))
    decision, c = judge(legacy, runs)
    assert decision.refusal == "hostile" and not marker.exists()


def test_decision_is_json_and_markdown(runs):
    decision, _ = judge(runs["made"]["broken 38k"], runs)
    data = json.loads(decision.to_json())
    assert data["action"] == "fresh" and data["candidates"][0]["evidence"]["moments"]["any_base_moments"]
    assert "| model_step38000.pth | foreign | 38000 | broken | fresh |" in decision.to_markdown()


def test_cli_prints_the_table_writes_json_and_exits_by_finding(runs, tmp_path, capsys):
    from fidel_tts.flows.cli import main
    from fidel_tts.trainer.errors import EXIT_HOSTILE, EXIT_QUARANTINED, EXIT_REFUSED

    p = runs["project"]
    ref = ["--base", str(p.base_checkpoint), "--tokenizer", str(p.tokenizer)]
    out = tmp_path / "triage.json"
    assert main(["triage", str(runs["made"]["fixed 25k"]), *ref, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "weight decay alone" in printed and "decision: resume" in printed
    assert json.loads(out.read_text())["candidates"][0]["finding"] == "fixed"
    assert main(["triage", str(tmp_path / "new-run"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["action"] == "fresh"
    assert main(["triage", str(runs["made"]["truncated"]), *ref]) == EXIT_QUARANTINED
    other = ["--base", str(p.base_checkpoint), "--tokenizer", str(p.base_tokenizer)]
    assert main(["triage", str(runs["made"]["other vocabulary"]), *other]) == EXIT_REFUSED
    evil = tmp_path / "evil.pth"
    torch.save({"step": Payload(tmp_path / "owned")}, evil)
    assert main(["triage", str(evil), *ref]) == EXIT_HOSTILE
    assert len({0, EXIT_REFUSED, EXIT_QUARANTINED, EXIT_HOSTILE, 1, 2}) == 6
