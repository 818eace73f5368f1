"""Atomic writes and hash-checked checkpoints."""

from __future__ import annotations

import pytest
import torch

import tokenloom
from tokenloom.checkpoint import (
    atomic_write,
    load_component,
    load_tensors,
    save_tensors,
    save_tokenizer,
)


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target, "w") as fh:
        fh.write("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_write_gives_the_usual_permissions(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "f.txt", "w") as fh:
            fh.write("x")
    finally:
        os.umask(umask)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644


def test_tensors_round_trip_and_corruption_is_detected(tmp_path):
    path = tmp_path / "t.safetensors"
    tensors = {"a": torch.arange(6.0).view(2, 3), "b": torch.tensor([1, 2, 3])}
    digest = save_tensors(path, tensors, {"note": "x"})
    loaded, meta = load_tensors(path)
    assert meta["sha256"] == digest and meta["note"] == "x"
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())

    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # flip bits in the tensor data
    path.write_bytes(bytes(raw))
    with pytest.raises(tokenloom.CheckpointError, match="content hash"):
        load_tensors(path)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(tokenloom.CheckpointError, match="corrupt checkpoint"):
        load_tensors(path)
    with pytest.raises(tokenloom.CheckpointError, match="not found"):
        load_tensors(tmp_path / "missing.safetensors")


def test_component_checkpoint_rebuilds_the_component(tmp_path):
    tok = tokenloom.create("tokenizer", "pixel", bits=3, pool=2, image_shape=(3, 8, 8))
    save_tokenizer(tmp_path / "tok.safetensors", tok, name="pixel", options={"bits": 3, "pool": 2})
    again = load_component(tmp_path / "tok.safetensors")
    assert again.config == tok.config and again.image_shape == (3, 8, 8)
