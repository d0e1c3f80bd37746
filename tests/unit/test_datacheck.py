"""The bad-input corpus: every fixture is generated from the tiny project, and each one must give either a
one-line FidelError naming the file, line and problem, or a row-level finding naming manifest, line, pair
and problem, and nothing on the other rows."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from fidel_tts.trainer.data.checks import (
    CHECKS,
    CheckSettings,
    DataReport,
    check_manifests,
    write_report_files,
)
from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.text.tokenizer import encode, load_tokenizer

from tests.fixtures.synthetic import TinyProject, make_tiny_project

PATH_FIELDS = ("target_text_ids_path", "target_codes_path", "prompt_condition_path", "prompt_emo_vec_path")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> TinyProject:
    return make_tiny_project(tmp_path_factory.mktemp("tiny"), n_train=24, n_val=8)


def records(manifest: Path) -> list[dict]:
    out = []
    for line in manifest.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        for key in PATH_FIELDS:
            record[key] = str((manifest.parent / record[key]).resolve())
        out.append(record)
    return out


class Corpus:
    """The tiny project's manifests as editable records (absolute paths), written into one test's folder."""

    def __init__(self, project: TinyProject, folder: Path):
        self.project, self.folder = project, folder
        self.train, self.val = records(project.train_manifest), records(project.val_manifest)
        self.lang = ""

    def save(self, name: str, array: np.ndarray) -> str:
        path = self.folder / name
        np.save(path, array)
        return str(path)

    def array(self, record: dict, key: str) -> np.ndarray:
        return np.load(record[key])

    def set_codes(self, record: dict, codes: np.ndarray, name: str) -> None:
        record["target_codes_path"] = self.save(name, codes)
        record["target_code_len"] = int(codes.shape[0]) if codes.ndim == 1 else int(codes.shape[-1])

    def write(self) -> tuple[Path, Path]:
        paths = []
        for name, rows in (("train", self.train), ("val", self.val)):
            path = self.folder / f"{name}.jsonl"
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            paths.append(path)
        return paths[0], paths[1]

    def specs(self) -> dict[str, list[str]]:
        train, val = self.write()
        return {"train": [f"{train}{self.lang}"], "val": [f"{val}{self.lang}"]}

    def check(self, **settings) -> DataReport:
        settings.setdefault("max_bad_rows", 0.5)
        return check_manifests(self.specs(), self.project.tokenizer, self.project.base_config,
                               CheckSettings(**settings))


@pytest.fixture
def corpus(project, tmp_path) -> Corpus:
    return Corpus(project, tmp_path)


def test_clean_corpus_has_no_findings(corpus):
    report = corpus.check()
    assert report.passed and report.findings == []
    assert report.splits["train"].kept == 24 and report.splits["val"].kept == 8
    assert report.splits["train"].speakers == 4


# ----------------------------------------------------------------------------- row-level findings

@dataclass
class RowCase:
    name: str
    mutate: Callable[[Corpus], list[int]]  # returns the 0-based train rows it broke
    check: str
    settings: dict | None = None


def missing_file(c):
    c.train[2]["target_codes_path"] = str(c.folder / "gone.npy")
    return [2]


def bad_npy(c):
    (c.folder / "bad.npy").write_bytes(b"\x93NUMPY this is not an array")
    c.train[3]["prompt_condition_path"] = str(c.folder / "bad.npy")
    return [3]


def codes_float(c):
    c.set_codes(c.train[4], c.array(c.train[4], "target_codes_path").astype(np.float32), "float_codes.npy")
    return [4]


def codes_2d(c):
    codes = c.array(c.train[5], "target_codes_path")
    c.set_codes(c.train[5], np.stack([codes, codes]), "codes_2d.npy")
    return [5]


def condition_shape(c):
    c.train[6]["prompt_condition_path"] = c.save("cond16.npy", c.array(c.train[6], "prompt_condition_path")[:16])
    return [6]


def emo_nan(c):
    emo = c.array(c.train[7], "prompt_emo_vec_path").copy()
    emo[3] = np.nan
    c.train[7]["prompt_emo_vec_path"] = c.save("emo_nan.npy", emo)
    return [7]


def condition_fp16_overflow(c):
    cond = c.array(c.train[8], "prompt_condition_path").copy()
    cond[0, 0] = 1e6
    c.train[8]["prompt_condition_path"] = c.save("cond_big.npy", cond)
    return [8]


def codes_above_codebook(c):
    codes = c.array(c.train[9], "target_codes_path").copy()
    codes[5] = 64  # the tiny codebook is 0..63
    c.set_codes(c.train[9], codes, "codes_64.npy")
    return [9]


def codes_negative(c):
    codes = c.array(c.train[10], "target_codes_path").copy()
    codes[0] = -1
    c.set_codes(c.train[10], codes, "codes_neg.npy")
    return [10]


def code_len_wrong(c):
    c.train[11]["target_code_len"] += 5
    return [11]


def codes_empty(c):
    c.set_codes(c.train[12], np.zeros(0, dtype=np.int32), "codes_empty.npy")
    return [12]


def text_empty(c):
    c.train[13]["target_text"] = "   "
    return [13]


def text_normalises_away(c):
    c.train[13]["target_text"] = "   "  # white space only: nothing after normalisation
    return [13]


def text_english(c):
    c.train[14]["target_text"] = "THE WAY OF THE WORD IS LONG."
    return [14]


def text_unknown_chars(c):
    c.train[15]["target_text"] = "ሰላም 你好 ዓለም።"
    return [15]


def text_too_long(c):
    c.train[16]["target_text"] = " ".join(["ትምህርት ቤተሰብ መጽሐፍ"] * 30) + "።"
    return [16]


def codes_too_long(c):
    codes = np.arange(320, dtype=np.int32) % 64
    c.set_codes(c.train[17], codes, "codes_320.npy")
    c.train[17]["target_duration"] = 6.4  # consistent with 50 Hz: only the position table is exceeded
    return [17]


def codes_padded_by_duration(c):
    codes = c.array(c.train[18], "target_codes_path")
    c.set_codes(c.train[18], np.concatenate([codes, np.full(60, 7, dtype=codes.dtype)]), "codes_pad.npy")
    return [18]


def codes_short_for_duration(c):
    c.train[19]["target_duration"] = round(c.train[19]["target_duration"] * 2 + 1, 3)
    return [19]


def codes_padded_in_batch(c, extra: int = 40):
    """batch > 1 preprocessing without durations (the community paired format has none): every item is
    stored at the batch's longest length and ends in the same padding codes. extra > 0: a longer clip, not
    in this manifest, set that length, so all four are padded."""
    for r in c.train + c.val:
        r.pop("target_duration")
    group = list(range(20, 24))
    longest = max(c.train[i]["target_code_len"] for i in group) + extra
    padding = np.random.default_rng(5).integers(0, 64, 400).astype(np.int32)
    for i in group:
        codes = c.array(c.train[i], "target_codes_path")
        if longest > len(codes):
            c.set_codes(c.train[i], np.concatenate([codes, padding[-(longest - len(codes)):]]), f"batched{i}.npy")
    return group


def ids_from_older_tokenizer(c):
    old = load_tokenizer(c.project.base_tokenizer)  # the base: written before the tokenizer was extended
    ids = np.asarray(encode(old, c.train[0]["target_text"]), dtype=np.int32)
    c.train[0]["target_text_ids_path"] = c.save("old_ids.npy", ids)
    c.train[0]["target_text_len"] = len(ids)
    return [0]


def prompt_is_target(c):
    c.train[1]["prompt_id"] = c.train[1]["target_id"]
    return [1]


def prompt_same_audio(c):
    c.train[2]["prompt_audio_path"] = c.train[2]["target_audio_path"] = "wavs/x.wav"
    return [2]


def cross_speaker_field(c):
    c.train[3]["prompt_speaker"] = "spk9"
    return [3]


def cross_speaker_by_id(c):
    other = next(r for r in c.train if r["speaker"] != c.train[4]["speaker"])
    c.train[4]["prompt_id"] = other["target_id"]
    return [4]


def duplicate_row(c):
    c.train.append(dict(c.train[5]))
    return [24]


def duplicate_recording(c):
    copy = dict(c.train[6], id="again", target_id="again")
    copy["target_codes_path"] = c.save("same_audio.npy", c.array(c.train[6], "target_codes_path"))
    copy["prompt_condition_path"] = c.train[7]["prompt_condition_path"]
    c.train.append(copy)
    return [24]


ROW_CASES = [
    RowCase("missing feature file", missing_file, "missing_file"),
    RowCase("not an npy file", bad_npy, "bad_npy"),
    RowCase("codes stored as float", codes_float, "wrong_dtype"),
    RowCase("codes 2-D", codes_2d, "wrong_shape"),
    RowCase("conditioning of the wrong shape", condition_shape, "wrong_shape"),
    RowCase("NaN in the emotion vector", emo_nan, "non_finite"),
    RowCase("conditioning beyond float16", condition_fp16_overflow, "fp16_overflow"),
    RowCase("codes >= codebook", codes_above_codebook, "codes_out_of_range"),
    RowCase("negative codes", codes_negative, "codes_out_of_range"),
    RowCase("target_code_len disagrees with the file", code_len_wrong, "code_len_mismatch"),
    RowCase("empty codes file", codes_empty, "empty_codes"),
    RowCase("empty text", text_empty, "empty_text"),
    RowCase("text that normalises to nothing", text_normalises_away, "empty_text"),
    RowCase("text in the wrong script", text_english, "wrong_script"),
    RowCase("characters the tokenizer lacks", text_unknown_chars, "unk"),
    RowCase("text too long for the position table", text_too_long, "text_too_long"),
    RowCase("codes too long for the position table", codes_too_long, "codes_too_long"),
    RowCase("codes padded past duration x 50", codes_padded_by_duration, "padded_codes"),
    RowCase("codes short of duration x 50", codes_short_for_duration, "codes_short"),
    RowCase("codes padded in a preprocessing batch", codes_padded_in_batch, "padded_codes"),
    RowCase("text ids of an older tokenizer", ids_from_older_tokenizer, "stale_text_ids"),
    RowCase("prompt = target (ids)", prompt_is_target, "prompt_is_target"),
    RowCase("prompt = target (audio)", prompt_same_audio, "prompt_is_target"),
    RowCase("cross-speaker pair (prompt_speaker)", cross_speaker_field, "cross_speaker"),
    RowCase("cross-speaker pair (prompt id of another speaker)", cross_speaker_by_id, "cross_speaker"),
    RowCase("the same pair twice", duplicate_row, "duplicate"),
    RowCase("the same recording under another file", duplicate_recording, "duplicate"),
]


@pytest.mark.parametrize("case", ROW_CASES, ids=[c.name for c in ROW_CASES])
def test_row_finding(corpus, case: RowCase):
    rows = case.mutate(corpus)
    report = corpus.check(**(case.settings or {}))
    manifest = str(corpus.folder / "train.jsonl")
    hits = [f for f in report.findings if f.check == case.check]
    assert {f.line for f in hits} == {r + 1 for r in rows}, [f.text() for f in report.findings]
    for f in hits:
        text = f.text()
        record = corpus.train[f.line - 1]
        assert "\n" not in text and text.startswith(f"{manifest}:{f.line}: pair {record['id']}: {case.check}: ")
        assert f.split == "train" and f.action == CHECKS[case.check][0]
    # nothing on the rows the case did not touch: no false positives
    assert {f.line for f in report.findings} <= {r + 1 for r in rows}, [f.text() for f in report.findings]
    dropped = {f.line for f in report.findings if f.action == "dropped"}
    assert report.splits["train"].kept == len(corpus.train) - len(dropped)


def test_padded_batch_spares_the_longest_item(corpus):
    """The longest clip of a batch has no padding: only the shorter ones are flagged."""
    lengths = {i: corpus.train[i]["target_code_len"] for i in range(20, 24)}
    rows = codes_padded_in_batch(corpus, extra=0)
    report = corpus.check()
    # a tail is evidence once at least tail_frames (16) codes of it are padding
    padded = {i + 1 for i in rows if max(lengths.values()) - lengths[i] >= 16}
    assert len(padded) >= 2 and {f.line for f in report.findings} == padded
    detail = next(f.detail for f in report.findings if f.check == "padded_codes")
    assert "other target(s) of the same length" in detail
    assert report.splits["train"].no_duration == 24


def test_stale_ids_are_repaired_not_dropped(corpus):
    ids_from_older_tokenizer(corpus)
    report = corpus.check()
    (finding,) = report.findings
    assert finding.action == "repaired" and "first difference" in finding.detail
    assert report.splits["train"].kept == 24 and report.splits["train"].repaired == 1


def test_leakage_into_validation(corpus):
    corpus.val.append(dict(corpus.train[5]))
    report = corpus.check()
    (finding,) = report.findings
    assert finding.split == "val" and finding.check == "leakage" and finding.line == 9
    assert finding.text().startswith(f"{corpus.folder / 'val.jsonl'}:9: pair {corpus.train[5]['id']}: leakage: ")
    assert report.splits["val"].kept == 8


def test_leakage_of_the_same_recording_under_another_name(corpus):
    leaked = dict(corpus.train[2], id="val-copy", target_id="val-copy")
    leaked["target_codes_path"] = corpus.save("copied.npy", corpus.array(corpus.train[2], "target_codes_path"))
    corpus.val.append(leaked)
    (finding,) = corpus.check().findings
    assert finding.check == "leakage" and finding.pair_id == "val-copy"


def test_language_suffix_skips_the_script_check(corpus):
    text_english(corpus)
    corpus.lang = "::en"
    report = corpus.check()
    assert not any(f.check == "wrong_script" for f in report.findings)
    assert report.fatal and "no training pair has ethiopic text" in report.fatal[0]  # and no Amharic at all


# ----------------------------------------------------------------------------- fatal problems

def test_no_amharic_is_fatal(corpus):
    for i, r in enumerate(corpus.train):
        r["target_text"] = f"THE WORD NUMBER {'ONE TWO THREE'.split()[i % 3]} IS HERE."
    report = corpus.check(max_bad_rows=1.0)
    assert not report.passed
    assert any("no training pair has ethiopic text" in f for f in report.fatal)


def test_too_many_bad_rows_is_fatal(corpus):
    for r in corpus.train[:5]:
        r["target_codes_path"] = str(corpus.folder / "gone.npy")
    report = corpus.check(max_bad_rows=0.1)
    assert report.fatal == ["train: 5 of 24 pairs dropped (20.8% > --max-bad-rows 10.0%)"]
    assert corpus.check(max_bad_rows=0.25).passed


def test_validation_emptied_by_leakage_is_fatal(corpus):
    corpus.val = [dict(r) for r in corpus.train[:4]]
    report = corpus.check(max_bad_rows=1.0)
    assert "val: no usable pairs left (4 all dropped)" in report.fatal


@dataclass
class FatalCase:
    name: str
    write: Callable[[Corpus, Path], None]  # writes the bad train manifest at the given path
    message: str  # what the one-line error says after "<path>: "


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def dumps(rows: list[dict]) -> list[str]:
    return [json.dumps(r, ensure_ascii=False) for r in rows]


def truncated_json(c, path):
    lines = dumps(c.train)
    lines[-1] = lines[-1][: len(lines[-1]) // 2]
    write_lines(path, lines)


def missing_field(c, path):
    del c.train[4]["target_codes_path"]
    write_lines(path, dumps(c.train))


def wrong_type(c, path):
    c.train[2]["target_code_len"] = str(c.train[2]["target_code_len"])
    write_lines(path, dumps(c.train))


def wrong_type_text(c, path):
    c.train[3]["target_text"] = ["ሰላም"]
    write_lines(path, dumps(c.train))


def not_utf8(c, path):
    data = "".join(line + "\n" for line in dumps(c.train)).encode("utf-8")
    at = data.index(b"\n", data.index(b"\n") + 1) + 20  # inside line 3
    path.write_bytes(data[:at] + b"\xe9" + data[at:])


def unpaired(c, path):
    rows = [{"id": r["target_id"], "text": r["target_text"], "speaker": r["speaker"],
             "text_ids_path": r["target_text_ids_path"], "codes_path": r["target_codes_path"],
             "condition_path": r["prompt_condition_path"], "emo_vec_path": r["prompt_emo_vec_path"]} for r in c.train]
    write_lines(path, dumps(rows))


def empty_manifest(c, path):
    write_lines(path, ["", "  "])


def not_an_object(c, path):
    write_lines(path, dumps(c.train[:3]) + ['["a", "list"]'])


def no_emotion_vector(c, path):
    del c.train[6]["prompt_emo_vec_path"]
    write_lines(path, dumps(c.train))


def empty_path(c, path):
    c.train[1]["prompt_condition_path"] = ""
    write_lines(path, dumps(c.train))


FATAL_CASES = [
    FatalCase("truncated JSON", truncated_json, "line 24: invalid JSON"),
    FatalCase("missing field", missing_field, "line 5: missing field 'target_codes_path'"),
    FatalCase("wrong type (length as string)", wrong_type, "line 3: field 'target_code_len' must be integer, got str"),
    FatalCase("wrong type (text as list)", wrong_type_text, "line 4: field 'target_text' must be string, got list"),
    FatalCase("non-UTF-8", not_utf8, "line 3: not UTF-8 (byte 0xe9"),
    FatalCase("unpaired manifest", unpaired, "line 1: unpaired manifest"),
    FatalCase("no records", empty_manifest, "manifest has no records"),
    FatalCase("a record that is not an object", not_an_object, "line 4: a record must be a JSON object, got list"),
    FatalCase("no emotion vector", no_emotion_vector, "line 7: missing field 'prompt_emo_vec_path'"),
    FatalCase("empty path", empty_path, "line 2: field 'prompt_condition_path' is empty"),
]


@pytest.mark.parametrize("case", FATAL_CASES, ids=[c.name for c in FATAL_CASES])
def test_fatal_error(corpus, case: FatalCase):
    path = corpus.folder / "bad.jsonl"
    case.write(corpus, path)
    with pytest.raises(FidelError) as info:
        check_manifests({"train": [str(path)]}, corpus.project.tokenizer, corpus.project.base_config)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: {case.message}"), message


def test_missing_manifest(corpus):
    gone = corpus.folder / "nowhere.jsonl"
    with pytest.raises(FidelError, match=f"^{gone}: manifest not found$"):
        check_manifests({"train": [f"{gone}::am"]}, corpus.project.tokenizer, corpus.project.base_config)


def test_unpaired_error_says_how_to_pair(corpus):
    path = corpus.folder / "utts.jsonl"
    unpaired(corpus, path)
    with pytest.raises(FidelError, match="fidel data pair --manifest .*utts.jsonl --out .*utts_pairs.jsonl"):
        check_manifests({"train": [str(path)]}, corpus.project.tokenizer, corpus.project.base_config)


def test_truncated_json_hints_at_an_interrupted_write(corpus):
    path = corpus.folder / "cut.jsonl"
    truncated_json(corpus, path)
    with pytest.raises(FidelError, match="interrupted write"):
        check_manifests({"train": [str(path)]}, corpus.project.tokenizer, corpus.project.base_config)


def test_bad_input_corpus_is_at_least_25():
    assert len(ROW_CASES) + len(FATAL_CASES) >= 25


# ----------------------------------------------------------------------------- report files

def test_report_files(corpus):
    missing_file(corpus)
    ids_from_older_tokenizer(corpus)
    report = corpus.check()
    written = write_report_files(report, corpus.folder / "report")
    names = {p.name for p in written}
    assert names == {"data_problems.parquet", "data_duration_s.png", "data_text_len.png", "data_code_len.png",
                     "data_check.md", "data_check.json"}
    table = pq.read_table(corpus.folder / "report" / "data_problems.parquet").to_pylist()
    assert {(r["check"], r["line"], r["action"]) for r in table} == {("missing_file", 3, "dropped"),
                                                                      ("stale_text_ids", 1, "repaired")}
    for png in (p for p in written if p.suffix == ".png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    markdown = (corpus.folder / "report" / "data_check.md").read_text(encoding="utf-8")
    assert "| missing_file | dropped | 1 | 0 |" in markdown and "| stale_text_ids | repaired | 1 | 0 |" in markdown
    saved = json.loads((corpus.folder / "report" / "data_check.json").read_text(encoding="utf-8"))
    assert saved["splits"]["train"]["counts"] == {"missing_file": 1, "stale_text_ids": 1}
    assert saved["passed"] is True and saved["splits"]["train"]["kept"] == 23


def test_relative_paths_resolve_against_the_manifest(project, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(project.root / "features", moved / "features")
    shutil.copy(project.train_manifest, moved / "train.jsonl")
    report = check_manifests({"train": [str(moved / "train.jsonl")]}, project.tokenizer, project.base_config)
    assert report.passed and report.splits["train"].kept == 24


# ----------------------------------------------------------------------------- the commands

def test_cli_check_build_and_pair(corpus, capsys):
    from fidel_tts.flows.cli import main

    train, val = corpus.write()
    common = ["--train", f"{train}::am", "--val", str(val), "--tokenizer", str(corpus.project.tokenizer),
              "--config", str(corpus.project.base_config)]
    assert main(["data", "check", *common, "--out", str(corpus.folder / "check")]) == 0
    out = capsys.readouterr().out
    assert "train: 24 of 24 pairs kept" in out and "PASSED: 32 pairs checked" in out
    assert (corpus.folder / "check" / "data_problems.parquet").is_file()

    assert main(["data", "build", *common, "--out", str(corpus.folder / "ds"), "--cond-dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "train: 24 rows → " in out and "conditioning float32, codes int16" in out
    assert (corpus.folder / "ds" / "report" / "data_code_len.png").is_file()

    missing_file(corpus)
    corpus.write()
    assert main(["data", "check", *common, "--max-bad-rows", "0.01", "--out", str(corpus.folder / "check2")]) == 1
    out = capsys.readouterr().out
    assert f"{train}:3: pair {corpus.train[2]['id']}: missing_file: codes file " in out and "FATAL: train: 1 of 24" in out

    src = corpus.folder / "utts.jsonl"
    unpaired(corpus, src)
    assert main(["data", "check", "--train", str(src), *common[4:]]) == 2
    assert "fidel data pair --manifest" in capsys.readouterr().err
    assert main(["data", "pair", "--manifest", str(src), "--out", str(corpus.folder / "paired.jsonl")]) == 0
    assert "pairs from 24 utterances of 4 speakers" in capsys.readouterr().out
    assert main(["data", "check", "--train", str(corpus.folder / "paired.jsonl"), *common[4:],
                 "--out", str(corpus.folder / "check3")]) == 0


@pytest.mark.slow
def test_flow_stage_builds_publishes_and_reuses(tiny_project, tmp_path, mlflow_uri):
    from fidel_tts.tasks.data import data_checks
    from fidel_tts.tasks.report import StageFailed
    from fidel_tts.tasks.spec import run_spec_from_dict
    from fidel_tts.tasks.tracking import open_run
    from mlflow import MlflowClient
    from prefect import flow

    def spec_for(out, **extra):
        return run_spec_from_dict({
            "train_manifests": [f"{tiny_project.train_manifest}::am"], "val_manifests": [str(tiny_project.val_manifest)],
            "tokenizer": str(tiny_project.tokenizer), "base_tokenizer": str(tiny_project.base_tokenizer),
            "config": str(tiny_project.base_config), "base_checkpoint": str(tiny_project.base_checkpoint),
            "output_dir": str(out), "tracking_uri": mlflow_uri, **extra}, tmp_path / "run.yaml")

    @flow
    def stage(spec, tracker):
        return data_checks(spec, tracker)

    spec = spec_for(tmp_path / "run")
    tracker = open_run(spec.output_dir, mlflow_uri)
    first = stage(spec, tracker)
    data = tmp_path / "run" / "data"
    assert first["data_dir"] == str(data) and first["summary"]["train"] == {"pairs": 48, "kept": 48, "speakers": 4}
    assert len(first["texts"]) == 48 + 12 and len(first["content_sha256"]) == 64
    assert spec.train_config(data).train_manifests == [str(data / "train.parquet")]
    client = MlflowClient(mlflow_uri)
    reports = {a.path for a in client.list_artifacts(tracker.run_id, "reports")}
    assert {"reports/data.md", "reports/data.json", "reports/data_problems.parquet", "reports/data_duration_s.png",
            "reports/data_text_len.png", "reports/data_code_len.png"} <= reports
    run = client.get_run(tracker.run_id)
    assert run.data.tags["data.checks"] == "PASS" and run.data.tags["data.train.kept"] == "48"
    assert run.data.params["data.content_sha256"] == first["content_sha256"]

    built = (data / "train.parquet").stat().st_mtime_ns
    again = stage(spec, tracker)  # a resume: same inputs, the build is reused untouched
    assert again["content_sha256"] == first["content_sha256"] and (data / "train.parquet").stat().st_mtime_ns == built

    bad = spec_for(tmp_path / "bad", max_bad_rows=0.0)
    rows = [json.loads(line) for line in tiny_project.train_manifest.read_text(encoding="utf-8").splitlines()]
    rows[0]["target_codes_path"] = "features/gone.npy"
    tiny_project.train_manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                           encoding="utf-8")
    with pytest.raises(StageFailed, match=r"^data checks: train: 1 of 48 pairs dropped"):
        stage(bad, open_run(bad.output_dir, mlflow_uri))
    assert not (tmp_path / "bad" / "data" / "train.parquet").exists()
    assert (tmp_path / "bad" / "reports" / "data_problems.parquet").is_file()


def test_a_bad_json_line_that_is_not_truncated_gets_no_truncation_hint(corpus):
    path = corpus.folder / "bad.jsonl"
    write_lines(path, dumps(corpus.train[:2]) + ['{"id": 1,, "x": 2}'])
    with pytest.raises(FidelError) as info:
        check_manifests({"train": [str(path)]}, corpus.project.tokenizer, corpus.project.base_config)
    assert "line 3: invalid JSON (Expecting property name" in str(info.value) and "interrupted" not in str(info.value)
