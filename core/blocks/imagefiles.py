"""Image files and image sets: the pieces every data set is built from.

:class:`ImageSet` (images in memory with labels), :func:`read_image` (a PIL
image read faithfully), :func:`read_metadata_captions` (``metadata.jsonl``
captions) and :func:`split_indices` (the seeded train/held-out split of a
finite set). :mod:`tokenloom.data` (in memory) and
:mod:`tokenloom.blocks.streaming` (lazily read) build on them; ``tokenloom.data``
re-exports every name.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from ..contract.errors import ConfigError, InputError


@attrs.frozen
class ImageSet:
    """Images with labels.

    - ``images``: ``FloatTensor[N, C, H, W]`` float32 in [-1, 1];
    - ``labels``: ``LongTensor[N]`` in ``[0, n_classes)``;
    - ``class_names``: one name per class;
    - ``attributes``: one dict per image (``shapes`` only; see the module
      docstring), else None;
    - ``captions``: one caption per image (``shapes``: written from its
      attributes by :func:`shapes_caption`; ``folder``: ``metadata.jsonl``),
      else None;
    - ``holdout_combos``: the ``[data] holdout_combos`` left out of the
      training split (``shapes``), for metrics that score them apart.
    """

    images: torch.Tensor
    labels: torch.Tensor
    n_classes: int
    class_names: tuple[str, ...]
    attributes: list[dict] | None = None
    captions: tuple[str, ...] | None = None
    holdout_combos: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.images.shape[0])


def split_indices(total: int, config: Any, split: str, seed: int, where: str) -> np.ndarray:
    """A seeded permutation: the first ``n_holdout`` are held out, the next
    ``n`` train. Indices come back sorted."""
    if config.n_holdout >= total:
        raise ConfigError([(f"data.n_holdout: {where} has {total} images, so n_holdout = {config.n_holdout} "
                            "leaves none to train on")])
    perm = np.random.default_rng(seed).permutation(total)
    if split == "holdout":
        idx = perm[: config.n_holdout]
    else:
        idx = perm[config.n_holdout : config.n_holdout + config.n]
        if len(idx) < config.n:
            warnings.warn(f"{where} has {total} images: the training split holds {len(idx)}, "
                          f"fewer than data.n = {config.n}", stacklevel=3)
    return np.sort(idx)


def read_metadata_captions(root: Path, files: list[Path]) -> list[str] | None:
    """The caption of each of ``files`` from ``root/metadata.jsonl`` (the
    Hugging Face imagefolder convention: one JSON object per line with
    ``file_name``, relative to ``root``, and ``text``), or None when there is
    no such file. A bad line, a row naming a missing file or an image without
    a row is an :class:`InputError` naming the file and line."""
    import json

    meta = root / "metadata.jsonl"
    if not meta.is_file():
        return None
    texts: dict[Path, str] = {}
    try:
        lines = meta.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as exc:
        raise InputError(f"{meta}: not UTF-8 text (byte 0x{exc.object[exc.start:exc.start + 1].hex()} at "
                         f"position {exc.start}); save it as UTF-8") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{meta}:{n}: not a JSON object ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) \
                or not isinstance(row.get("text"), str):
            raise InputError(f"{meta}:{n}: expected {{\"file_name\": \"...\", \"text\": \"...\"}}")
        path = (root / row["file_name"]).resolve()
        if not path.is_file():
            raise InputError(f"{meta}:{n}: file_name {row['file_name']!r} names no file under {root}")
        texts[path] = row["text"]
    missing = [p for p in files if p.resolve() not in texts]
    if missing:
        raise InputError(f"{meta}: no caption for {len(missing)} image(s), e.g. {missing[0]} "
                         "(add a line {\"file_name\": ..., \"text\": ...} for each image)")
    return [texts[p.resolve()] for p in files]


IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
#: The most classes an ``npz`` data set may imply by its largest label alone (without ``class_names``).
MAX_CLASSES = 65536


#: The colour transparent pixels are composited onto (white, as image viewers show them).
ALPHA_BACKGROUND: tuple[int, int, int] = (255, 255, 255)


def read_image(im: Any, mode: str, *, where: str) -> tuple[np.ndarray, str | None]:
    """A PIL image as ``uint8 [H, W, C]`` in ``mode`` (``"L"`` or ``"RGB"``),
    read faithfully, and a note saying what was converted (None: nothing):

    - 16-bit (and 32-bit integer) grey is scaled to 0..255 (``v / 257``), not
      clipped (which turns it nearly all white); float images are refused;
    - palette images are expanded (with their transparency);
    - transparency is composited onto :data:`ALPHA_BACKGROUND` (white) —
      an alpha channel that is fully opaque is dropped without a note;
    - an animated image (GIF, APNG, WebP) gives its first frame.
    """
    from PIL import Image

    note = []
    frames = int(getattr(im, "n_frames", 1) or 1)
    if frames > 1:
        im.seek(0)
        note.append(f"animated ({frames} frames): first frame used")
    im.load()
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64) if im.mode != "I" else np.asarray(im).astype(np.float64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"32-bit integer pixel values outside 0..65535 (range {a.min():.0f}..{a.max():.0f})")
        grey = np.round(a / 257.0).astype(np.uint8)
        note.append("16-bit: scaled to 8 bits")
        arr = grey[..., None] if mode == "L" else np.repeat(grey[..., None], 3, axis=2)
        return np.ascontiguousarray(arr), "; ".join(note)
    if im.mode == "F":
        raise ValueError("floating-point pixels (mode F) are not supported: save the image as 8- or 16-bit")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in ("LA", "La", "PA", "RGBa") or (im.mode in ("L", "1") and "transparency" in im.info):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        alpha = np.asarray(im.getchannel("A"))
        if alpha.size and alpha.min() < 255:
            background = Image.new("RGBA", im.size, (*ALPHA_BACKGROUND, 255))
            im = Image.alpha_composite(background, im)
            note.append("with transparency: composited onto white")
        im = im.convert("RGB")
    arr = np.asarray(im.convert(mode), dtype=np.uint8)
    return arr.reshape(arr.shape[0], arr.shape[1], -1), "; ".join(note) or None


_split_indices = split_indices  # the old private name

__all__ = [
    "ALPHA_BACKGROUND",
    "IMAGE_EXTENSIONS",
    "MAX_CLASSES",
    "ImageSet",
    "read_image",
    "read_metadata_captions",
    "split_indices",
]
