"""Crash-safe writes: the final name holds the old file or the new one, never a torn one."""

import os
import stat

import pytest
import torch

from callbacks.checkpoint_io import atomic_copy, atomic_save, remove_temporary_files


def test_atomic_save_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "epoch_0.pth"
    atomic_save({"epoch": 0}, path)
    atomic_save({"epoch": 1, "w": torch.ones(3)}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["epoch_0.pth"]


def test_new_files_follow_the_umask_not_0600(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_save({"epoch": 0}, tmp_path / "a.pth")
        atomic_copy(tmp_path / "a.pth", tmp_path / "b.pth")
    finally:
        os.umask(previous)
    for name in ("a.pth", "b.pth"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "best_model.pth"
    atomic_save({"epoch": 3}, path)

    class Unsaveable:
        def __reduce__(self):
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_save({"epoch": 4, "bad": Unsaveable()}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["best_model.pth"]


def test_leftover_temporaries_are_removed_at_start(tmp_path):
    (tmp_path / ".tmp-epoch_3.pth.abc123.tmp").write_bytes(b"half a file")
    (tmp_path / "epoch_2.pth").write_bytes(b"keep")
    removed = remove_temporary_files(tmp_path)
    assert [p.name for p in removed] == [".tmp-epoch_3.pth.abc123.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["epoch_2.pth"]
