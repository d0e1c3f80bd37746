"""Manifests, the .npy reader, pairing, the bucketed sampler and what training reads."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
from fidel_tts.trainer.data.checks import CheckSettings, check_manifests
from fidel_tts.trainer.data.loader import training_data
from fidel_tts.trainer.data.manifest import (
    BucketBatchSampler,
    padding_efficiency,
    pair_manifest,
    random_batches,
    read_manifests,
    read_npy,
    sorted_batches,
    split_manifest_spec,
)
from fidel_tts.trainer.data.parquet import build_dataset
from fidel_tts.trainer.errors import FidelError

from tests.fixtures.synthetic import TinyProject, make_tiny_project


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> TinyProject:
    return make_tiny_project(tmp_path_factory.mktemp("tiny"), n_train=24, n_val=8)


# ----------------------------------------------------------------------------- .npy

@pytest.mark.parametrize("array", [
    np.arange(7, dtype=np.int32), np.arange(6, dtype=np.int16).reshape(2, 3), np.zeros(0, dtype=np.int64),
    np.array(3.5, dtype=np.float32), np.ones((1, 32, 4), dtype=np.float16), np.arange(5, dtype=">i4"),
    np.array([True, False]), np.arange(4, dtype=np.uint8), np.linspace(0, 1, 9, dtype=np.float64),
], ids=lambda a: f"{a.dtype.str}{list(a.shape)}")
def test_read_npy_is_np_load(tmp_path, array):
    np.save(tmp_path / "a.npy", array)
    got = read_npy(tmp_path / "a.npy")
    assert got.dtype == array.dtype and got.shape == array.shape and np.array_equal(got, array)


def test_read_npy_falls_back_to_numpy_for_the_rest(tmp_path):
    fortran = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    np.save(tmp_path / "f.npy", fortran)
    assert np.array_equal(read_npy(tmp_path / "f.npy"), fortran)
    with open(tmp_path / "v2.npy", "wb") as f:
        np.lib.format.write_array(f, np.arange(3, dtype=np.int32), version=(2, 0))
    assert read_npy(tmp_path / "v2.npy").tolist() == [0, 1, 2]
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        read_npy(tmp_path / "o.npy")  # no pickles, as np.load(allow_pickle=False)
    buffer = io.BytesIO()
    np.save(buffer, np.arange(100, dtype=np.int32))
    (tmp_path / "cut.npy").write_bytes(buffer.getvalue()[:-10])
    with pytest.raises(ValueError):
        read_npy(tmp_path / "cut.npy")
    with pytest.raises(FileNotFoundError):
        read_npy(tmp_path / "none.npy")


# ----------------------------------------------------------------------------- manifests and pairing

def test_manifest_specs_and_languages(project, tmp_path):
    assert split_manifest_spec("a/b.jsonl::am") == (split_manifest_spec("a/b.jsonl")[0], "am")
    pairs = read_manifests([f"{project.train_manifest}::xx", str(project.val_manifest)])
    assert len(pairs) == 32 and {p.language for p in pairs[:24]} == {"xx"} and {p.language for p in pairs[24:]} == {"am"}
    assert pairs[0].codes_path == project.root / "features" / "train00000.codes.npy"
    assert pairs[0].where == f"{project.train_manifest}:1"


def unpaired_manifest(project: TinyProject, folder):
    rows = []
    for line in project.train_manifest.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        rows.append({"id": r["target_id"], "speaker": r["speaker"], "language": "am", "text": r["target_text"],
                     "text_ids_path": str(project.root / r["target_text_ids_path"]),
                     "text_len": r["target_text_len"], "codes_path": str(project.root / r["target_codes_path"]),
                     "code_len": r["target_code_len"], "duration": r["target_duration"],
                     "condition_path": str(project.root / r["prompt_condition_path"]),
                     "emo_vec_path": str(project.root / r["prompt_emo_vec_path"])})
    rows.append({**rows[0], "id": "lonely", "speaker": "spk_alone"})
    path = folder / "utts.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_pair_an_unpaired_manifest(project, tmp_path):
    src = unpaired_manifest(project, tmp_path)
    out = tmp_path / "sub" / "pairs.jsonl"
    summary = pair_manifest(src, out, pairs_per_target=2, seed=3)
    assert summary.pairs == 48 and summary.speakers == 4 and summary.skipped_speakers == ["spk_alone"]
    pairs = read_manifests([out])
    assert all(p.prompt_id != p.target_id and p.prompt_speaker == p.speaker for p in pairs)
    assert all(p.codes_path.resolve().is_file() for p in pairs)  # paths rewritten relative to the new file
    report = check_manifests({"train": [str(out)]}, project.tokenizer, project.base_config)
    assert report.passed and report.findings == []
    with pytest.raises(FidelError, match="already exists"):
        pair_manifest(src, out)


# ----------------------------------------------------------------------------- the sampler

def lengths(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Text and code lengths shaped like real speech: codes ≈ 4 per text id, 1-12 s."""
    rng = random.Random(seed)
    texts = [rng.randint(5, 120) for _ in range(n)]
    return texts, [max(20, int(t * rng.uniform(3.0, 5.0))) for t in texts]


def test_sampler_is_a_function_of_seed_and_epoch():
    texts, codes = lengths(500)
    a = BucketBatchSampler(texts, codes, batch_size=8, seed=7)
    b = BucketBatchSampler(texts, codes, batch_size=8, seed=7)
    assert a.epoch_batches(3) == b.epoch_batches(3)
    assert a.epoch_batches(3) != a.epoch_batches(4)
    assert a.epoch_batches(3) != BucketBatchSampler(texts, codes, batch_size=8, seed=8).epoch_batches(3)
    for epoch in range(3):
        flat = sorted(i for batch in a.epoch_batches(epoch) for i in batch)
        assert flat == list(range(500))  # every item exactly once


def test_batches_are_regrouped_every_epoch():
    """One window can hold a small dataset whole; the length jitter still regroups its batches each epoch."""
    texts, codes = lengths(200)
    sampler = BucketBatchSampler(texts, codes, batch_size=8, seed=0)
    assert sampler.window >= 200
    groups = [{tuple(sorted(b)) for b in sampler.epoch_batches(e)} for e in range(2)]
    assert len(groups[0] & groups[1]) < len(groups[0]) / 2
    still = BucketBatchSampler(texts, codes, batch_size=8, seed=0, jitter=0.0)
    assert {tuple(sorted(b)) for b in still.epoch_batches(0)} == {tuple(sorted(b)) for b in still.epoch_batches(1)}


def test_sampler_resumes_mid_epoch():
    texts, codes = lengths(300)
    sampler = BucketBatchSampler(texts, codes, batch_size=8, seed=1)
    everything = list(sampler)  # epoch 0, then the state moves to epoch 1
    assert sampler.state.epoch == 1 and sampler.state.position == 0
    interrupted = BucketBatchSampler(texts, codes, batch_size=8, seed=1)
    seen = []
    for batch in interrupted:
        seen.append(batch)
        if len(seen) == 5:
            break
    state = interrupted.state.to_dict()
    assert state == {"epoch": 0, "position": 5, "seed": 1}
    resumed = BucketBatchSampler(texts, codes, batch_size=8, seed=99)
    resumed.load_state(state)
    assert seen + list(resumed) == everything
    assert resumed.epoch_batches(0)[5:] == everything[5:]  # the training loop's slicing


def test_sampler_keeps_the_token_budget():
    texts, codes = lengths(800, seed=2)
    sampler = BucketBatchSampler(texts, codes, batch_size=16, seed=0, max_tokens=6000, max_batch=40)
    for batch in sampler.epoch_batches(0):
        cost = len(batch) * (max(texts[i] for i in batch) + max(codes[i] for i in batch))
        assert cost <= 6000 or len(batch) == 1
        assert len(batch) <= 40
    sizes = sorted(len(b) for b in sampler.epoch_batches(0))
    assert sizes[0] < 16 < sizes[-1]  # short items share big batches, long ones small
    default = BucketBatchSampler(texts, codes, batch_size=16, seed=0)  # no budget: the community's batch count
    assert sorted(len(b) for b in default.epoch_batches(0)) == [16] * 50


def test_bucketing_pads_little_and_random_batching_does_not():
    texts, codes = lengths(2000, seed=3)
    bucketed = padding_efficiency(BucketBatchSampler(texts, codes, 16, seed=0).epoch_batches(0), texts, codes)
    shuffled = padding_efficiency(random_batches(2000, 16, seed=0), texts, codes)
    assert bucketed >= 0.9 and shuffled < 0.7, (bucketed, shuffled)


def test_validation_batches_are_sorted_and_complete():
    texts, codes = lengths(50)
    batches = sorted_batches(texts, codes, 8)
    assert sorted(i for b in batches for i in b) == list(range(50))
    flat = [codes[i] for b in batches for i in b]
    assert flat == sorted(flat)


# ----------------------------------------------------------------------------- what training reads

def test_training_data_from_parquet_or_jsonl(project, tmp_path):
    build_dataset({"train": [str(project.train_manifest)], "val": [str(project.val_manifest)]}, project.tokenizer,
                  project.base_config, tmp_path / "ds")
    parquet = training_data([tmp_path / "ds" / "train.parquet"], [tmp_path / "ds" / "val.parquet"], 8, seed=0,
                            tokenizer=project.tokenizer)
    jsonl = training_data([project.train_manifest], [project.val_manifest], 8, seed=0, tokenizer=project.tokenizer)
    assert (parquet.source, jsonl.source) == ("parquet", "jsonl")
    assert parquet.sampler.epoch_batches(2) == jsonl.sampler.epoch_batches(2)  # same lengths, same batches
    assert parquet.val_batches == jsonl.val_batches
    assert torch.equal(parquet.train_set[4].codes, jsonl.train_set[4].codes)
    with pytest.raises(FidelError, match="mixes Parquet datasets and JSONL manifests"):
        training_data([tmp_path / "ds" / "train.parquet", project.train_manifest], [project.val_manifest], 8, 0)


@pytest.mark.slow
def test_training_on_parquet_equals_training_on_jsonl(project, tmp_path):
    """float32 conditioning and re-tokenised ids equal to the stored ones: the same run, bit for bit."""
    from fidel_tts.trainer.training.options import TrainConfig
    from fidel_tts.trainer.training.trainer import train

    build_dataset({"train": [str(project.train_manifest)], "val": [str(project.val_manifest)]}, project.tokenizer,
                  project.base_config, tmp_path / "ds", CheckSettings(cond_dtype="float32"))
    results = []
    for name, train_specs, val_specs in (
            ("jsonl", [str(project.train_manifest)], [str(project.val_manifest)]),
            ("parquet", [str(tmp_path / "ds" / "train.parquet")], [str(tmp_path / "ds" / "val.parquet")])):
        tc = TrainConfig(train_manifests=train_specs, val_manifests=val_specs, tokenizer=str(project.tokenizer),
                         config=str(project.base_config), output_dir=str(tmp_path / name),
                         base_checkpoint=str(project.base_checkpoint), max_steps=4, batch_size=8, warmup_steps=1,
                         learning_rate=1e-3, log_interval=1, val_interval=2, save_interval=4, seed=3, device="cpu")
        results.append(train(tc))
    jsonl, parquet = results
    assert parquet.status == jsonl.status == "completed"
    assert parquet.val_history == jsonl.val_history
    assert parquet.last_train["train_mel_loss"] == jsonl.last_train["train_mel_loss"]
