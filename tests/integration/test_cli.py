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
from fidel_tts.flows.cli import main

FIDEL = [sys.executable, "-m", "fidel_tts.flows.cli"]


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
    assert err == "error: --batch-tokens: must be at least 1, got -5"
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
                            cwd=Path(__file__).resolve().parents[2], env={**os.environ, "PYTHONUNBUFFERED": "1"})
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
    from fidel_tts.trainer.checkpoints.triage import triage_output_dir

    decision = triage_output_dir(tmp_path / "out")
    assert decision.action == "resume" and f"saved at step {decision.candidates[0].step}" in output


def test_speed_flags_reach_the_train_config(tiny_project, tmp_path, monkeypatch):
    import fidel_tts.trainer.training.trainer as train_module
    from fidel_tts.trainer.training.hooks import TrainResult

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
    from fidel_tts.tasks.spec import run_spec_from_dict

    raw = {k: "x" for k in ("tokenizer", "base_tokenizer", "config", "base_checkpoint", "output_dir")}
    raw.update(train_manifests=["t.jsonl"], val_manifests=["v.jsonl"],
               train={"batch_tokens": 6000, "compile": True, "activation_checkpointing": True})
    tc = run_spec_from_dict(raw, tmp_path / "run.yaml").train_config()
    assert (tc.batch_tokens, tc.compile, tc.activation_checkpointing) == (6000, True, True)



@pytest.mark.parametrize("resume", ["auto", "", "runs/old/model_step25000.pth", "/abs/latest.pth"])
def test_the_run_files_resume_path_resolves_against_its_folder_like_the_others(tmp_path, resume):
    from fidel_tts.tasks.spec import run_spec_from_dict

    raw = {k: "x" for k in ("tokenizer", "base_tokenizer", "config", "base_checkpoint", "output_dir")}
    raw.update(train_manifests=["t.jsonl"], val_manifests=["v.jsonl"], resume=resume)
    spec = run_spec_from_dict(raw, tmp_path / "cfg" / "run.yaml")
    expected = resume if resume in ("auto", "") else str((tmp_path / "cfg" / resume).resolve())
    assert spec.resume == expected and spec.tokenizer == str((tmp_path / "cfg" / "x").resolve())

def test_readme_option_table_is_the_definition(capsys):
    assert main(["options", "--markdown"]) == 0
    table = capsys.readouterr().out
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    start = readme.index("<!-- options table: generated by `fidel options --markdown` -->\n")
    shown = readme[readme.index("\n", start) + 1:readme.index("<!-- end of options table -->")]
    assert shown == table, "README option table is stale: paste `fidel options --markdown` between the markers"


def test_one_default_per_option_whichever_way_it_is_given(tmp_path, monkeypatch):
    import fidel_tts.trainer.training.trainer as train_module
    from fidel_tts.tasks.spec import run_spec_from_dict
    from fidel_tts.trainer.training.hooks import TrainResult
    from fidel_tts.trainer.training.options import TrainConfig

    seen = []
    monkeypatch.setattr(train_module, "train", lambda tc, hooks: seen.append(tc) or TrainResult("completed", 0, 0, None, {}))
    paths = ["--tokenizer", "t", "--config", "c", "--base-checkpoint", "b", "--output-dir", str(tmp_path / "o")]
    assert main(["train", "--train-manifest", "a", "--val-manifest", "b", *paths]) == 0
    raw = {k: "x" for k in ("tokenizer", "base_tokenizer", "config", "base_checkpoint", "output_dir")}
    from_yaml = run_spec_from_dict({**raw, "train_manifests": "a", "val_manifests": "b"}, tmp_path / "run.yaml")
    in_python = TrainConfig(["a"], ["b"], "t", "c", "o")
    settings = ("val_interval", "save_interval", "log_interval", "warmup_steps", "learning_rate", "keep_last")
    for name in settings:
        assert getattr(seen[0], name) == getattr(from_yaml.train_config(), name) == getattr(in_python, name), name


@pytest.mark.parametrize("flags, line", [
    (["--learning-rate", "-1"], "error: --learning-rate: must be at least 0, got -1"),
    (["--learning-rate", "nan"], "error: --learning-rate: must be a finite number, got nan"),
    (["--grad-clip", "-1"], "error: --grad-clip: must be above 0, got -1"),
    (["--text-loss-weight", "-0.2"], "error: --text-loss-weight: must be at least 0, got -0.2"),
    (["--warmup-steps", "-5"], "error: --warmup-steps: must be at least 0, got -5"),
    (["--nproc", "0"], "error: --nproc: must be at least 1, got 0"),
    (["--num-workers", "-1"], "error: --num-workers: must be at least 0, got -1"),
    (["--save-interval", "x"], "error: --save-interval: expected an integer, got 'x'"),
    (["--amp", "fp8"], "error: --amp: choose from off, auto, bf16, fp16, got 'fp8'"),
])
def test_bad_flag_values_name_the_flag_as_typed(tmp_path, capsys, flags, line):
    out = tmp_path / "out"
    assert main(["train", "--train-manifest", "a", "--val-manifest", "b", "--output-dir", str(out), *flags]) == 2
    assert capsys.readouterr().err.strip() == line and not out.exists()


def test_community_spellings_reach_the_same_option(tmp_path, monkeypatch):
    import fidel_tts.trainer.training.trainer as train_module
    from fidel_tts.trainer.training.hooks import TrainResult

    seen = []
    monkeypatch.setattr(train_module, "train", lambda tc, hooks: seen.append(tc) or TrainResult("completed", 0, 0, None, {}))
    base = ["train", "--train-manifest", "a", "--val-manifest", "b", "--output-dir", str(tmp_path)]
    assert main([*base, "--grad-checkpointing", "--amp", "--save-every", "7", "--max-steps", "0", "--no-keep-best"]) == 0
    tc = seen[0]
    assert (tc.activation_checkpointing, tc.amp, tc.save_interval, tc.max_steps, tc.keep_best) == (True, "auto", 7, None, False)


def test_progress_is_plain_lines_off_a_terminal(monkeypatch):
    import io
    import itertools

    import fidel_tts.trainer.training.progress as progress

    clock = itertools.chain([0.0, 1.0, 31.0, 40.0, 41.0], itertools.count(100.0))
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    stream = io.StringIO()
    bar = progress.Progress("training", 4, stream=stream, every_s=30.0)
    for step in (1, 2, 3, 4):
        bar.update(step, {"train_text_loss": 1.5, "train_mel_loss": 2.25})
    bar.close()
    assert stream.getvalue().splitlines() == ["training: step 0/4 (0%)",
                                              "training: step 2/4 (50%) text loss 1.500, mel loss 2.250",
                                              "training: step 4/4 (100%) text loss 1.500, mel loss 2.250"]
    lines = []
    progress.Progress("training", 4, stream=io.StringIO(), log=lines.append, every_s=0).update(1, {})
    assert lines == ["training: step 0/4 (0%)", "training: step 1/4 (25%)"]


@pytest.mark.slow
def test_a_failing_run_ends_with_fidels_line(tiny_project, tmp_path):
    import yaml

    settings = tiny_project.flow_settings(tmp_path / "out", f"sqlite:///{tmp_path}/mlflow.db", max_steps=2)
    broken = tmp_path / "broken.model"
    broken.write_bytes(b"not a model")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**settings, "tokenizer": str(broken)}))
    done = subprocess.run([*FIDEL, "run", "--config", str(tmp_path / "run.yaml")], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=600)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines[-1].startswith(f"error: {broken}: not a sentencepiece model"), done.stderr
    assert "Traceback" not in done.stderr and "temporary server" not in done.stderr
    assert not (tmp_path / "out").exists()  # refused by the up-front checks, before Prefect wrote its log


@pytest.mark.slow
def test_a_temporary_server_too_slow_to_start_is_one_line_naming_the_setting(tiny_project, tmp_path):
    import yaml

    settings = tiny_project.flow_settings(tmp_path / "out", f"sqlite:///{tmp_path}/mlflow.db", max_steps=2)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(settings))
    env = {**os.environ, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([*FIDEL, "run", "--config", str(tmp_path / "run.yaml")], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=600, env=env)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "error: Prefect's temporary server did not start within 1 s: raise "
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or set PREFECT_API_URL to a running server"], done.stderr


def test_an_unexpected_error_is_one_line_with_the_traceback_in_a_file(monkeypatch, capsys):
    import fidel_tts.flows.cli.train as cli_train

    def broken(args):
        raise RuntimeError("something fidel did not foresee")

    monkeypatch.setattr(cli_train, "cmd_options", broken)
    assert main(["options"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unexpected RuntimeError: something fidel did not foresee (traceback in ")
    saved = Path(err.removesuffix(")").rsplit("traceback in ", 1)[1])
    assert "Traceback" in saved.read_text() and "\n" not in err
    saved.unlink()


def shifted_copy(tokenizer: Path, out: Path) -> Path:
    """The tokenizer with two base pieces swapped: its base rows would be trained on the wrong pieces."""
    from fidel_tts.trainer.text.tokenizer import load_model_proto, write_model

    proto = load_model_proto(tokenizer)
    proto.pieces[5].piece, proto.pieces[6].piece = proto.pieces[6].piece, proto.pieces[5].piece
    write_model(proto, out)
    return out


def test_fidel_run_refuses_shifted_base_pieces_before_prefect_or_mlflow(tiny_project, tmp_path, capsys):
    import yaml

    settings = tiny_project.flow_settings(tmp_path / "out", f"sqlite:///{tmp_path}/mlruns/mlflow.db", max_steps=2)
    settings["tokenizer"] = str(shifted_copy(tiny_project.tokenizer, tmp_path / "shifted.model"))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(settings))
    assert main(["run", "--config", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {tmp_path / 'shifted.model'}: does not extend base tokenizer"), err
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "out").exists()


def test_fidel_train_takes_the_bpe_model_beside_the_base_checkpoint_as_the_base_tokenizer(tiny_project, tmp_path,
                                                                                          capsys):
    import shutil

    release = tmp_path / "release"
    release.mkdir()
    shutil.copy(tiny_project.base_checkpoint, release / "gpt.pth")
    shutil.copy(tiny_project.base_tokenizer, release / "bpe.model")
    args = train_args(tiny_project, tmp_path / "out")
    args[args.index("--base-checkpoint") + 1] = str(release / "gpt.pth")
    args[args.index("--tokenizer") + 1] = str(shifted_copy(tiny_project.tokenizer, tmp_path / "shifted.model"))
    assert main(args) == 2
    captured = capsys.readouterr()
    assert f"base tokenizer: {release / 'bpe.model'} (beside the base checkpoint" in captured.out + captured.err
    assert captured.err.strip().splitlines()[-1].startswith(
        f"error: {tmp_path / 'shifted.model'}: does not extend base tokenizer {release / 'bpe.model'}")
    assert not (tmp_path / "out").exists()
