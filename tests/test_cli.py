"""The `fidel` command: community train_gpt_v2.py flags, exit codes, triage and export."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.cli import main

FIDEL = [sys.executable, "-m", "flows.cli"]


def train_args(project, out, *extra):
    return ["train", "--train-manifest", str(project.train_manifest), "--val-manifest", str(project.val_manifest),
            "--tokenizer", str(project.tokenizer), "--config", str(project.base_config),
            "--base-checkpoint", str(project.base_checkpoint), "--output-dir", str(out), "--epochs", "2",
            "--batch-size", "8", "--learning-rate", "3e-3", "--text-loss-weight", "0.3", "--mel-loss-weight", "0.7",
            "--warmup-steps", "2", "--log-interval", "2", "--val-interval", "4", "--save-every", "4", *extra]


def test_train_accepts_the_community_flags(tiny_project, tmp_path, capsys):
    assert main(train_args(tiny_project, tmp_path / "out")) == 0
    out = capsys.readouterr().out
    two_epochs = int(re.search(r"completed at step (\d+)/\1;", out).group(1))
    assert two_epochs > 0 and "val_text_loss" in out and "saved " in out
    assert main(train_args(tiny_project, tmp_path / "out", "--resume", "auto", "--epochs", "3")) == 0
    three_epochs = int(re.search(r"completed at step (\d+)/\1;", capsys.readouterr().out).group(1))
    assert three_epochs == two_epochs * 3 // 2


def test_bad_input_is_one_line_naming_the_file(tiny_project, tmp_path, capsys):
    missing = tmp_path / "absent.yaml"
    assert main(train_args(tiny_project, tmp_path / "out", "--config", str(missing))) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {missing}: config file not found"


def test_counts_that_are_not_positive_are_one_line_and_write_nothing(tiny_project, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(train_args(tiny_project, out, "--batch-tokens", "-5", "--save-every", "0")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --save-interval 0, --batch-tokens -5: must be a positive count") and "\n" not in err
    assert not out.exists()


def test_triage_and_export_commands(tiny_project, tmp_path, capsys):
    assert main(train_args(tiny_project, tmp_path / "out")) == 0
    capsys.readouterr()
    assert main(["triage", str(tmp_path / "out"), "--json"]) == 0
    decision = json.loads(capsys.readouterr().out)
    assert decision["action"] == "resume" and decision["checkpoint"].endswith(".pt")
    assert main(["export", decision["checkpoint"], "--out", str(tmp_path / "export")]) == 0
    record = json.loads(capsys.readouterr().out)
    assert f"step{record['step']:08d}" in decision["checkpoint"] and (tmp_path / "export" / "gpt.pth").is_file()
    assert (tmp_path / "export" / "bpe.model").read_bytes() == Path(tiny_project.tokenizer).read_bytes()
    assert main(["export", decision["checkpoint"], "--out", str(tmp_path / "export")]) == 2  # never overwrites


@pytest.mark.slow
def test_sigterm_saves_within_seconds_and_exits_75(tiny_project, tmp_path):
    args = train_args(tiny_project, tmp_path / "out", "--epochs", "400", "--save-every", "1000")
    proc = subprocess.Popen(FIDEL + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=Path(__file__).resolve().parents[1], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        if line.startswith("step ") or time.monotonic() > deadline:
            break
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 75, output
    assert time.monotonic() - sent < 10
    assert "preempted" in output
    from trainer.triage import triage_output_dir

    decision = triage_output_dir(tmp_path / "out")
    assert decision.action == "resume" and f"saved at step {decision.candidates[0].step}" in output


def test_speed_flags_reach_the_train_config(tiny_project, tmp_path, monkeypatch):
    import trainer.train as train_module
    from trainer.train import TrainResult

    seen = []
    monkeypatch.setattr(train_module, "train",
                        lambda tc, hooks: seen.append(tc) or TrainResult("completed", 0, 0, None, {}))
    assert main(train_args(tiny_project, tmp_path / "out")) == 0
    assert main(train_args(tiny_project, tmp_path / "out", "--batch-tokens", "4000", "--compile",
                           "--activation-checkpointing")) == 0
    default, fast = seen
    assert (default.batch_tokens, default.compile, default.activation_checkpointing) == (None, False, False)
    assert (fast.batch_tokens, fast.compile, fast.activation_checkpointing) == (4000, True, True)


def test_the_run_file_takes_the_speed_settings(tmp_path):
    from tasks.spec import run_spec_from_dict

    raw = {k: "x" for k in ("tokenizer", "base_tokenizer", "config", "base_checkpoint", "output_dir")}
    raw.update(train_manifests=["t.jsonl"], val_manifests=["v.jsonl"],
               train={"batch_tokens": 6000, "compile": True, "activation_checkpointing": True})
    tc = run_spec_from_dict(raw, tmp_path / "run.yaml").train_config()
    assert (tc.batch_tokens, tc.compile, tc.activation_checkpointing) == (6000, True, True)
