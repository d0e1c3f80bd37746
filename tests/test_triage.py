"""Triage on real checkpoints of the tiny model: community runs trained without the fix (gradient drift, and
weight decay alone), with the hooks and no decay (fixed), fidel checkpoints young and old, and files that must
never be loaded (truncated, random bytes, wrong vocabulary, another config, a pickle with code)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from trainer.community_run import community_run
from trainer.triage import Reference, TriagePolicy, triage_path

# the tiny runs are a few steps long, so the guide's 5k / 20k / 50k thresholds are scaled down (they are settings)
POLICY = TriagePolicy(fresh_below=2, resume_from=5, definitely_from=50)


@pytest.fixture(scope="module")
def runs(tiny_project_template, tmp_path_factory):
    p = tiny_project_template
    root = tmp_path_factory.mktemp("triage")
    common = (p.base_checkpoint, p.base_config, p.tokenizer, p.train_manifest)
    broken = community_run(*common, root / "broken", steps=2, freeze="none", weight_decay=0.01)[-1]
    decay_only = community_run(*common, root / "decay_only", steps=2, freeze="hooks", weight_decay=0.1)[-1]
    young, old = community_run(*common, root / "fixed", steps=6, save_at=(1,), freeze="hooks", weight_decay=0.0)
    return {"project": p, "root": root, "broken": broken, "decay_only": decay_only, "young": young, "old": old,
            "ref": Reference.load(p.base_checkpoint, p.tokenizer)}


def judge(path, runs, policy=POLICY):
    decision = triage_path(path, ref=runs["ref"], policy=policy)
    return decision, decision.candidates[0]


def test_broken_run_without_freezing_starts_fresh(runs):
    decision, c = judge(runs["broken"], runs)
    assert decision.action == "fresh" and c.finding == "broken"
    drift = c.evidence["drift"]["text_embedding.weight"]
    assert drift["rows_changed"] == runs["ref"].base_rows and drift["max_abs_delta"] > 0
    assert not drift["uniform_shrink"]
    assert c.evidence["moments"]["any_base_moments"] is True
    assert "gradient drift" in decision.reason and "trained without the fix" in decision.reason


def test_weight_decay_only_is_told_apart_from_gradient_drift(runs):
    decision, c = judge(runs["decay_only"], runs)
    assert decision.action == "fresh" and c.finding == "broken"
    drift = c.evidence["drift"]["text_embedding.weight"]
    assert drift["uniform_shrink"] and 0.99 < drift["shrink_factor"] < 1.0
    assert c.evidence["moments"]["any_base_moments"] is False  # the hooks zeroed the gradients: no moments
    assert "weight-decay shrink" in decision.reason and "without the fix" not in decision.reason


def test_experimental_policy_picks_the_repair_for_a_broken_run(runs):
    decision, _ = judge(runs["broken"], runs, replace(POLICY, policy="experimental"))
    assert decision.action == "experimental" and decision.checkpoint == str(runs["broken"])
    assert "text-loss gate" in decision.reason


def test_fixed_run_young_starts_fresh_and_old_resumes(runs):
    young, c = judge(runs["young"], runs)
    assert young.action == "fresh" and c.finding == "fixed" and "little lost" in young.reason
    assert c.evidence["drift"]["text_embedding.weight"]["rows_changed"] == 0
    old, c = judge(runs["old"], runs)
    assert old.action == "resume" and old.checkpoint == str(runs["old"]) and "6 ≥ 5" in old.reason
    assert c.evidence["scheduler"]["last_epoch"] == 6 and c.evidence["scheduler"]["phase"] == "decay"
    assert c.evidence["moments"]["new_rows_with_moments"] > 0
    forced = triage_path(runs["old"], ref=runs["ref"], policy=replace(POLICY, policy="force-fresh"))
    assert forced.action == "fresh"


def test_community_output_dir_uses_its_most_advanced_checkpoint(runs):
    decision = triage_path(runs["old"].parent, ref=runs["ref"], policy=POLICY)
    assert decision.action == "resume" and decision.checkpoint == str(runs["old"])
    assert len(decision.candidates) == 2


@pytest.mark.slow
def test_fidel_checkpoints_young_and_old_resume_with_lineage(runs, make_train_config, tmp_path):
    from trainer.train import train

    p = runs["project"]
    tc = make_train_config(p, tmp_path / "fidel", max_steps=6, save_interval=1, keep_last=10, val_interval=3)
    train(tc)
    for step in (1, 6):
        path = tmp_path / "fidel" / f"ckpt-step{step:08d}.pt"
        decision, c = judge(path, runs)
        assert decision.action == "resume" and c.kind == "fidel" and c.step == step
        assert c.evidence["lineage_id"] and c.evidence["new_rows"]["new_rows_moved"] > 0
    decision = triage_path(tmp_path / "fidel", ref=runs["ref"], policy=POLICY)
    assert decision.action == "resume" and decision.checkpoint.endswith("ckpt-step00000006.pt")
    other = Reference.load(p.base_checkpoint)  # same base, but another tokenizer hash
    other = replace(other, tokenizer_sha256="0" * 64)
    assert triage_path(tmp_path / "fidel", ref=other).action == "refuse"


def test_corrupt_files_are_quarantined_never_loaded(runs, tmp_path):
    truncated = tmp_path / "model_step9.pth"
    data = runs["old"].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    decision, c = judge(truncated, runs)
    assert decision.action == "refuse" and c.finding == "corrupt"
    for seed in range(4):  # random bytes break the unpickler in different ways
        noise = tmp_path / f"noise{seed}.pth"
        noise.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(seed),
                                        dtype=torch.uint8).numpy().tobytes())
        decision, c = judge(noise, runs)
        assert decision.action == "refuse" and c.finding == "corrupt", c.detail
    flipped = tmp_path / "flipped.pth"
    shutil.copy(runs["old"], flipped)
    (tmp_path / "flipped.pth.sha256").write_text("f" * 64 + "  flipped.pth\n")
    decision, c = judge(flipped, runs)
    assert c.finding == "corrupt" and "sha256" in c.detail


def test_wrong_vocabulary_and_other_config_are_incompatible(runs, tmp_path):
    raw = torch.load(runs["old"], weights_only=True)
    small = dict(raw, model={k: (v[:-5] if k.startswith(("text_embedding", "text_head")) else v)
                             for k, v in raw["model"].items()})
    torch.save(small, tmp_path / "vocab.pth")
    decision, c = judge(tmp_path / "vocab.pth", runs)
    assert decision.action == "refuse" and c.finding == "incompatible" and "N+1" in c.detail
    wide = dict(raw, model={**raw["model"], "mel_head.weight": torch.zeros(3, 3)})
    torch.save(wide, tmp_path / "config.pth")
    decision, c = judge(tmp_path / "config.pth", runs)
    assert decision.action == "refuse" and c.finding == "incompatible" and "mel_head.weight" in c.detail


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
    assert decision.action == "refuse" and c.finding == "hostile" and not marker.exists()
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps(Payload(marker)))
    decision, c = judge(legacy, runs)
    assert decision.action == "refuse" and not marker.exists()


def test_decision_is_json_and_markdown(runs):
    decision, _ = judge(runs["broken"], runs)
    data = json.loads(decision.to_json())
    assert data["action"] == "fresh" and data["candidates"][0]["evidence"]["moments"]["any_base_moments"]
    assert "| model_step2.pth | foreign | 2 | broken | fresh |" in decision.to_markdown()


def test_cli_prints_the_table_and_writes_json(runs, tmp_path, capsys):
    from flows.cli import main

    p = runs["project"]
    out = tmp_path / "triage.json"
    args = ["triage", str(runs["broken"]), "--base", str(p.base_checkpoint), "--tokenizer", str(p.tokenizer),
            "--fresh-below", "2", "--resume-from", "5", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "broken" in printed and "decision: fresh" in printed
    assert json.loads(out.read_text())["candidates"][0]["finding"] == "broken"
    assert main(["triage", str(tmp_path / "new-run"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["action"] == "fresh"
