"""The Parquet dataset of `fidel data build` and its memory-mapped reader."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import fidel_tts.trainer.data.parquet as parquet_data
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fidel_tts.trainer.data.checks import CheckSettings
from fidel_tts.trainer.data.manifest import collate, read_manifest
from fidel_tts.trainer.data.parquet import ParquetPairs, build_dataset, read_dataset_info
from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.text.tokenizer import encode, load_tokenizer

from tests.fixtures.synthetic import TinyProject, make_tiny_project


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> TinyProject:
    return make_tiny_project(tmp_path_factory.mktemp("tiny"), n_train=24, n_val=8)


def splits(project: TinyProject) -> dict[str, list[str]]:
    return {"train": [f"{project.train_manifest}::am"], "val": [str(project.val_manifest)]}


def build(project: TinyProject, out: Path, **settings):
    settings.setdefault("max_bad_rows", 0.5)
    return build_dataset(splits(project), project.tokenizer, project.base_config, out, CheckSettings(**settings))


def test_rows_hold_the_manifest_pairs(project, tmp_path):
    report, info = build(project, tmp_path / "ds", cond_dtype="float32")
    assert report.passed and info["cond_dtype"] == "float32" and info["codes_dtype"] == "int16"
    table = pq.read_table(tmp_path / "ds" / "train.parquet")
    assert table.schema.field("codes").type == pa.list_(pa.field("element", pa.int16()))
    assert table.schema.field("condition").type.value_type == pa.float32()
    pairs = read_manifest(project.train_manifest)
    rows = table.to_pylist()
    assert [r["pair_id"] for r in rows] == [p.id for p in pairs]  # one row per pair, manifest order
    sp = load_tokenizer(project.tokenizer)
    for row, pair in zip(rows, pairs, strict=True):
        assert row["text_ids"] == encode(sp, pair.text)
        assert row["codes"] == np.load(pair.codes_path).tolist()
        assert np.array_equal(np.asarray(row["condition"], np.float32).reshape(32, -1), np.load(pair.condition_path))
        assert np.array_equal(np.asarray(row["emo_vec"], np.float32), np.load(pair.emo_vec_path))
        assert row["language"] == "am" and row["source"] == f"{pair.manifest}:{pair.line}"
    meta = json.loads(pq.ParquetFile(tmp_path / "ds" / "train.parquet").metadata.metadata[b"fidel"])
    assert meta["rows"] == 24 and meta["content_sha256"] == info["splits"]["train"]["content_sha256"]
    assert meta["tokenizer_sha256"] == info["tokenizer_sha256"] and meta["condition_shape"] == [32, 32]
    assert read_dataset_info(tmp_path / "ds")["content_sha256"] == info["content_sha256"]


def test_float16_is_the_default_and_recorded(project, tmp_path):
    _, info = build(project, tmp_path / "ds")
    assert info["cond_dtype"] == "float16"
    table = pq.read_table(tmp_path / "ds" / "val.parquet", columns=["condition"])
    assert table.schema.field("condition").type.value_type == pa.float16()
    ds = ParquetPairs([tmp_path / "ds" / "val.parquet"])
    pair = read_manifest(project.val_manifest)[0]
    exact = torch.from_numpy(np.load(pair.condition_path))
    assert ds[0].condition.dtype == torch.float32
    assert torch.allclose(ds[0].condition, exact, rtol=1e-3, atol=1e-4) and not torch.equal(ds[0].condition, exact)


def test_reader_gives_what_the_npy_files_hold(project, tmp_path):
    build(project, tmp_path / "ds", cond_dtype="float32")
    ds = ParquetPairs([tmp_path / "ds" / "train.parquet"], tokenizer=project.tokenizer)
    from fidel_tts.trainer.data.manifest import PairDataset

    npy = PairDataset(read_manifest(project.train_manifest))
    assert len(ds) == len(npy) == 24
    for i in range(len(ds)):
        a, b = ds[i], npy[i]
        for name in ("text_ids", "codes", "condition", "emo_vec"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (i, name)
    text_lengths, code_lengths = ds.lengths()
    assert text_lengths.tolist() == [p.text_len for p in npy.pairs]
    assert code_lengths.tolist() == [p.code_len for p in npy.pairs]
    batch = [3, 17, 0, 9]
    assert torch.equal(collate(ds.__getitems__(batch)).codes, collate([npy[i] for i in batch]).codes)


def test_stale_ids_are_retokenised(project, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    records = [json.loads(line) for line in project.train_manifest.read_text(encoding="utf-8").splitlines()]
    base = load_tokenizer(project.base_tokenizer)
    for r in records:
        old = np.asarray(encode(base, r["target_text"]), dtype=np.int32)
        np.save(folder / f"{r['target_id']}.old.npy", old)
        r["target_text_ids_path"] = str(folder / f"{r['target_id']}.old.npy")
        r["target_text_len"] = len(old)
        for key in ("target_codes_path", "prompt_condition_path", "prompt_emo_vec_path"):
            r[key] = str(project.root / r[key])
    manifest = folder / "stale.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    report, info = build_dataset({"train": [str(manifest)]}, project.tokenizer, project.base_config, tmp_path / "ds")
    assert report.splits["train"].repaired == 24 and report.splits["train"].kept == 24
    sp = load_tokenizer(project.tokenizer)
    rows = pq.read_table(tmp_path / "ds" / "train.parquet", columns=["text", "text_ids"]).to_pylist()
    assert all(r["text_ids"] == encode(sp, r["text"]) for r in rows)


def test_content_hash_is_deterministic_and_tracks_the_rows(project, tmp_path):
    _, first = build(project, tmp_path / "a")
    _, second = build(project, tmp_path / "b")
    assert first["content_sha256"] == second["content_sha256"]
    assert first["splits"]["train"]["file_sha256"] == second["splits"]["train"]["file_sha256"]
    shutil.copytree(project.root, tmp_path / "copy")
    changed = make_copy_with_one_code_changed(tmp_path / "copy")
    _, third = build_dataset({"train": [str(changed)], "val": [str(tmp_path / "copy" / "val.jsonl")]},
                             project.tokenizer, project.base_config, tmp_path / "c", CheckSettings(max_bad_rows=0.5))
    assert third["splits"]["val"]["content_sha256"] == first["splits"]["val"]["content_sha256"]
    assert third["splits"]["train"]["content_sha256"] != first["splits"]["train"]["content_sha256"]


def make_copy_with_one_code_changed(root: Path) -> Path:
    pair = read_manifest(root / "train.jsonl")[5]
    codes = np.load(pair.codes_path)
    codes[0] = (codes[0] + 1) % 64
    np.save(pair.codes_path, codes)
    return root / "train.jsonl"


def test_dropped_rows_are_not_in_the_dataset(project, tmp_path):
    _, clean = build(project, tmp_path / "clean")
    folder = tmp_path / "m"
    shutil.copytree(project.root, folder)
    lines = (folder / "train.jsonl").read_text(encoding="utf-8").splitlines()
    broken = json.loads(lines[2])
    broken["target_codes_path"] = "features/none.npy"
    lines[2] = json.dumps(broken, ensure_ascii=False)
    lines.append(lines[7])  # an exact duplicate: passes the row checks, dropped by the dataset-level ones
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    report, info = build_dataset({"train": [str(folder / "train.jsonl")]}, project.tokenizer, project.base_config,
                                 tmp_path / "ds", CheckSettings(max_bad_rows=0.5))
    assert {f.check for f in report.findings} == {"missing_file", "duplicate"}
    ids = pq.read_table(tmp_path / "ds" / "train.parquet", columns=["pair_id"]).column("pair_id").to_pylist()
    clean_ids = pq.read_table(tmp_path / "clean" / "train.parquet", columns=["pair_id"]).column("pair_id").to_pylist()
    assert ids == clean_ids[:2] + clean_ids[3:] and info["splits"]["train"]["rows"] == 23
    assert not list((tmp_path / "ds").glob(".*partial"))


def test_row_groups_are_sized_for_streaming(project, tmp_path, monkeypatch):
    monkeypatch.setattr(parquet_data, "ROW_GROUP_BYTES", 1)  # the floor: 128 rows a group
    assert parquet_data.rows_per_group(project.cfg, "float16") == 128
    monkeypatch.setattr(parquet_data, "rows_per_group", lambda cfg, dtype: 5)
    _, info = build(project, tmp_path / "ds")
    source = pq.ParquetFile(tmp_path / "ds" / "train.parquet")
    assert source.num_row_groups == 5 and info["splits"]["train"]["row_groups"] == 5
    assert [source.metadata.row_group(i).num_rows for i in range(5)] == [5, 5, 5, 5, 4]
    ds = ParquetPairs([tmp_path / "ds" / "train.parquet"])
    assert len(ds.open()) == 5  # one memory-mapped chunk per row group
    across = [4, 5, 23, 0, 11]
    singles = [ds[i] for i in across]
    for a, b in zip(ds.__getitems__(across), singles, strict=True):
        assert torch.equal(a.codes, b.codes) and torch.equal(a.condition, b.condition)
    assert parquet_data.rows_per_group(project.cfg.__class__(**{**project.cfg.__dict__, "model_dim": 1280}),
                                       "float16") < 65536


def test_a_failed_check_writes_no_dataset(project, tmp_path):
    _, info = build(project, tmp_path / "ds")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()}
    folder = tmp_path / "m"
    shutil.copytree(project.root, folder)
    rows = [json.loads(line) for line in (folder / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    for r in rows:
        r["target_text"] = "ENGLISH ONLY."
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    report, none = build_dataset({"train": [str(folder / "train.jsonl")]}, project.tokenizer, project.base_config,
                                 tmp_path / "ds", CheckSettings(max_bad_rows=1.0))
    assert none is None and not report.passed
    assert {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()} == before  # the last good build stays


def test_files_fidel_did_not_write_are_never_overwritten(project, tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "train.parquet").write_bytes(b"precious")
    with pytest.raises(FidelError, match="was not written by `fidel data build`"):
        build(project, out)
    assert (out / "train.parquet").read_bytes() == b"precious"


def test_reader_refuses_another_tokenizer(project, tmp_path):
    build(project, tmp_path / "ds")
    with pytest.raises(FidelError, match="text ids are stale; rebuild"):
        ParquetPairs([tmp_path / "ds" / "train.parquet"], tokenizer=project.base_tokenizer)


def test_reader_refuses_a_plain_parquet(tmp_path):
    pq.write_table(pa.table({"a": [1, 2]}), tmp_path / "x.parquet")
    with pytest.raises(FidelError, match="not a fidel dataset"):
        ParquetPairs([tmp_path / "x.parquet"])
    with pytest.raises(FidelError, match="dataset file not found"):
        ParquetPairs([tmp_path / "y.parquet"])


def test_arrow_cache_follows_the_content(project, tmp_path):
    build(project, tmp_path / "ds", cond_dtype="float32")
    path = tmp_path / "ds" / "train.parquet"
    first = ParquetPairs([path])[5].codes.clone()
    assert path.with_suffix(".arrow").is_file()
    shutil.copytree(project.root, tmp_path / "copy")
    changed = make_copy_with_one_code_changed(tmp_path / "copy")
    build_dataset({"train": [str(changed)]}, project.tokenizer, project.base_config, tmp_path / "ds",
                  CheckSettings(max_bad_rows=0.5, cond_dtype="float32"))
    second = ParquetPairs([path])[5].codes
    assert second[0] == (first[0] + 1) % 64 and torch.equal(second[1:], first[1:])


def test_reader_survives_pickling_and_workers(project, tmp_path):
    build(project, tmp_path / "ds")
    ds = ParquetPairs([tmp_path / "ds" / "train.parquet"])
    ds.open()
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.chunks is None and torch.equal(clone[7].codes, ds[7].codes)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=[[0, 1, 2], [3, 4]], collate_fn=collate, num_workers=1)
    sizes = [batch.size for batch in loader]
    assert sizes == [3, 2]
