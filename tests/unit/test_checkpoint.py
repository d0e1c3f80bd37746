import pickle

import pytest
import torch
from fidel_tts.trainer.checkpoints.triage import triage_output_dir, triage_path
from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.files import atomic_write_bytes
from fidel_tts.trainer.training.checkpoint import (
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def save(folder, step):
    return save_checkpoint(folder, step, {"model": {"w": torch.full((3,), float(step))}}, {"lineage_id": "abc"})


def test_save_writes_file_and_sidecar_atomically(tmp_path):
    saved = save(tmp_path, 7)
    assert saved.path.name == "ckpt-step00000007.pt"
    assert saved.sidecar["step"] == 7 and len(saved.sidecar["sha256"]) == 64
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    state, meta = load_checkpoint(saved.path)
    assert torch.equal(state["model"]["w"], torch.full((3,), 7.0)) and meta["lineage_id"] == "abc"


def test_corrupt_newest_checkpoint_is_passed_over(tmp_path):
    save(tmp_path, 10)
    newest = save(tmp_path, 20).path
    newest.write_bytes(newest.read_bytes()[:-50])  # truncated mid-write by a crash
    path, rejected = latest_valid_checkpoint(tmp_path)
    assert path.name == "ckpt-step00000010.pt"
    assert rejected[0][0] == newest and "sha256" in rejected[0][1]
    with pytest.raises(FidelError, match="does not match its sidecar"):
        load_checkpoint(newest)
    decision = triage_output_dir(tmp_path)
    assert decision.action == "resume" and decision.checkpoint.endswith("ckpt-step00000010.pt")
    assert "passed over 1" in decision.reason


def test_checkpoint_without_sidecar_is_never_loaded(tmp_path):
    path = save(tmp_path, 5).path
    path.with_suffix(".json").unlink()
    with pytest.raises(FidelError, match="no sidecar"):
        load_checkpoint(path)
    assert triage_output_dir(tmp_path).action == "refuse"


def test_malicious_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(Evil()))
    decision = triage_path(path)
    assert decision.action == "refuse" and decision.candidates[0].finding == "hostile"
    from fidel_tts.trainer.model.weights import torch_load

    with pytest.raises(FidelError, match="evil.pt"):
        torch_load(path)


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step)
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in removed] == ["ckpt-step00000002.pt", "ckpt-step00000001.pt"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-step00000004.pt", "ckpt-step00000003.pt"]
    assert not (tmp_path / "ckpt-step00000001.json").exists()


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    saved = save_checkpoint(tmp_path, 1, {"rng": rng_state()}, {})
    expected = (torch.rand(2), np.random.rand(2), random.random())
    torch.manual_seed(99)
    set_rng_state(load_checkpoint(saved.path)[0]["rng"])
    assert torch.equal(torch.rand(2), expected[0])
    assert np.array_equal(np.random.rand(2), expected[1]) and random.random() == expected[2]


def test_empty_dir_triages_fresh(tmp_path):
    assert triage_output_dir(tmp_path / "nothing").action == "fresh"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_honour_the_umask(tmp_path, umask):
    """Checkpoints and exports start as temp files; they end with the mode any file the user writes gets."""
    import os
    import stat

    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "gpt.pth", lambda h: h.write(b"weights"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "gpt.pth").stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["gpt.pth"]
