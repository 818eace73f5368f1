"""Captions in the data: a ``folder`` data set reads ``metadata.jsonl`` (the Hugging Face
imagefolder convention), every bad row a clear error naming the file and line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import tokenloom
from tokenloom.config import DataConfig
from tokenloom.data import load_dataset


def _png(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), colour, dtype=np.uint8)).save(path)


def _tree(root):
    for i in range(3):
        _png(root / "cats" / f"{i}.png", (255, 255, 255))
        _png(root / "dogs" / f"{i}.png", (0, 0, 0))


def _meta(root, rows):
    (root / "metadata.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def test_folder_reads_captions_from_metadata_jsonl(tmp_path):
    _tree(tmp_path)
    _meta(tmp_path, [{"file_name": f"{c}/{i}.png", "text": f"a {'white' if c == 'cats' else 'black'} {c[:-1]} {i}"}
                     for c in ("cats", "dogs") for i in range(3)])
    cfg = DataConfig(name="folder", path=str(tmp_path), size=8, n=4, n_holdout=2)
    for split in ("train", "holdout"):
        s = load_dataset(cfg, split=split)
        assert s.captions is not None and len(s.captions) == len(s)
        for img, label, caption in zip(s.images, s.labels.tolist(), s.captions):
            assert caption.startswith("a white cat" if label == 0 else "a black dog")
            assert (img.mean() > 0.9) == (label == 0)
    assert load_dataset(DataConfig(name="shapes", size=8, n=4, n_holdout=2)).captions is not None


def test_folder_without_metadata_has_no_captions(tmp_path):
    _tree(tmp_path)
    assert load_dataset(DataConfig(name="folder", path=str(tmp_path), size=8, n=4, n_holdout=2)).captions is None


@pytest.mark.parametrize(("rows", "match"), [
    (["{not json"], r"metadata.jsonl:1: not a JSON object"),
    ([{"file_name": "cats/0.png"}], r"metadata.jsonl:1: expected"),
    ([{"file_name": "cats/9.png", "text": "x"}], r"metadata.jsonl:1: file_name 'cats/9.png' names no file"),
    ([{"file_name": "cats/0.png", "text": "x"}], r"no caption for 5 image\(s\)"),
])
def test_bad_metadata_rows_are_input_errors(tmp_path, rows, match):
    _tree(tmp_path)
    _meta(tmp_path, rows)
    with pytest.raises(tokenloom.InputError, match=match):
        load_dataset(DataConfig(name="folder", path=str(tmp_path), size=8, n=4, n_holdout=2))
