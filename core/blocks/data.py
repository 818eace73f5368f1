"""Built-in data sets, all offline and deterministic.

:func:`load_dataset` turns a ``[data]`` table (:class:`tokenloom.config.DataConfig`)
into an :class:`ImageSet`: float32 images ``[N, C, H, W]`` in [-1, 1] with
class labels; :func:`open_dataset` is the same for sets too large for memory: the
``folder`` and ``hf`` sets come back as a :class:`~tokenloom.blocks.streaming.StreamSet`
whose images are read lazily (:mod:`tokenloom.blocks.streaming`), the others as
here. Five sources:

``shapes``
    Procedural scenes with known ground truth. Every image shows 1–3 shapes of
    **one** class (``circle``, ``square`` or ``triangle``) on a black
    background; each shape has its own colour from a 6-colour palette
    (:data:`SHAPES_COLOURS`), a half-extent of 10–22 % of the image side
    (smaller when there are more shapes) and a centre drawn so that it lies
    wholly inside the image, with a gap of at least 1/16 of the side between
    the bounding boxes of two shapes. **The class label is the shape class**
    (index into :data:`SHAPE_CLASSES`), so a class-conditional model is asked
    for "circles", and a rule-checking oracle can verify that every shape it
    finds is of that class, in a palette colour, 1–3 of them, not touching.
    Pixels are filled where their centre lies inside the shape (no
    anti-aliasing), so every pixel is exactly the background or a palette
    colour. Image *i* is a pure function of ``(seed, i)`` (randomness from
    :class:`tokenloom.rng.RowRNG`); positions and sizes are fractions of the
    image side, so image *i* shows the same scene at 16, 32 or 64 px. The
    training split is indices ``0..n-1``, the held-out split
    ``n..n+n_holdout-1``. ``attributes[i]`` holds ``label``, ``class``,
    ``count``, ``colours``, ``positions`` (centres ``(x, y)`` as fractions),
    ``sizes`` (half-extents as fractions) and ``shapes`` (the same per shape,
    plus its pixel bounding box). :func:`render_shapes` draws a scene from its
    attributes; :func:`shape_regions` is the one parser of an image (palette
    snapping and 4-connected regions, used by the ``shapes-oracle`` metric),
    and :func:`parse_shapes` reads the shapes back through it.
``digits``
    scikit-learn's bundled 8×8 handwritten digits (1797 images, no download),
    upscaled to ``size`` bilinearly, grey replicated to ``channels``; labels
    0–9. A seeded permutation splits them: the first ``n_holdout`` of the
    permutation are held out, the next ``n`` are the training split (fewer
    when the set is smaller — a warning says so).
``folder``
    An ImageFolder tree ``path/<class_name>/*.png|jpg|jpeg|bmp|gif|webp``; the
    class is the sub-folder (sorted names → labels 0..). Images must share
    one square size (resized to ``size`` if it differs); split as ``digits``.
    Images are read faithfully (:func:`read_image`): 16-bit grey is scaled
    to 8 bits, palettes are expanded, transparency is composited onto white,
    an animated image gives its first frame — each kind of conversion with
    one note on stderr naming how many images and one of them.
``hf``
    A Hugging Face ``datasets`` directory on local disk (an optional extra:
    ``pip install 'tokenloom[datasets]'``); read through
    :mod:`tokenloom.blocks.streaming`, which also streams ``folder`` and
    ``hf`` sets lazily (:func:`tokenloom.blocks.streaming.open_dataset`)
    instead of loading them here.
``npz``
    A ``.npz`` file with an array ``images`` — ``uint8`` ``[N, H, W, C]`` (or
    ``[N, H, W]``) in 0..255, or float ``[N, C, H, W]`` in [-1, 1] — and
    optionally ``labels`` (integers ``[N]``, each below the number of
    ``class_names`` when given, else below :data:`MAX_CLASSES`) and
    ``class_names`` (strings); split as ``digits``.

Bad data is an :class:`~tokenloom.errors.InputError` naming the file or array
(missing path, empty folder, unreadable file, mixed sizes, wrong dtype or
range); a bad ``[data]`` table is a :class:`~tokenloom.errors.ConfigError`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..contract.errors import ConfigError, InputError
from .imagefiles import (
    ALPHA_BACKGROUND,
    IMAGE_EXTENSIONS,
    MAX_CLASSES,
    ImageSet,
    _split_indices,
    read_image,
    read_metadata_captions,
)
from .shapes import (
    SHAPE_CLASSES,
    SHAPE_FILL_RATIO,
    SHAPES_BACKGROUND,
    SHAPES_CAPTION_TEMPLATES,
    SHAPES_COLOURS,
    SHAPES_MIN_SIZE,
    SHAPES_RULES,
    combo_matches,
    parse_caption,
    parse_combo,
    parse_shapes,
    render_shapes,
    shape_bbox,
    shape_regions,
    shapes_attributes,
    shapes_caption,
)
from .streaming import STREAMED, StreamSet, load_hf, open_streamed

DATASETS: tuple[str, ...] = ("shapes", "digits", "folder", "npz", "hf")
SPLITS: tuple[str, ...] = ("train", "holdout")


def _shapes(config: Any, split: str, seed: int) -> ImageSet:
    size = config.size
    if size < SHAPES_MIN_SIZE:
        raise ConfigError([f"data.size: shapes needs images of at least {SHAPES_MIN_SIZE} px, got {size}"])
    if config.channels != 3:
        raise ConfigError([f"data.channels: shapes are coloured and need channels = 3, got {config.channels}"])
    start, count = (0, config.n) if split == "train" else (config.n, config.n_holdout)
    attributes = shapes_attributes(seed, range(start, start + count))
    combos = [parse_combo(c, where=f"data.holdout_combos[{i}]")
              for i, c in enumerate(getattr(config, "holdout_combos", ()) or ())]
    if combos and split == "train":  # compositional generalisation: these combinations are never trained on
        attributes = [a for a in attributes if not any(combo_matches(c, a) for c in combos)]
        if not attributes:
            raise ConfigError(["data.holdout_combos: every training image matches a held-out combination"])
    for a in attributes:
        for p in a["shapes"]:
            p["bbox"] = shape_bbox(p, size)
    images = torch.stack([render_shapes(a, size) for a in attributes]) if attributes else torch.empty(0, 3, size, size)
    labels = torch.tensor([a["label"] for a in attributes], dtype=torch.long)
    captions = tuple(shapes_caption(a) for a in attributes)
    return ImageSet(images.float().contiguous(), labels, len(SHAPE_CLASSES), SHAPE_CLASSES, attributes, captions,
                    tuple(getattr(config, "holdout_combos", ()) or ()))


# ---------------------------------------------------------------------------
# finite sets: digits, folder, npz
# ---------------------------------------------------------------------------


def _resize(x: torch.Tensor, size: int, where: str) -> torch.Tensor:
    """Resize float images ``[N, C, h, w]`` to ``size``×``size`` (square only)."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if h != w:
        raise InputError(f"{where}: images are {h}×{w}; only square images can be resized to {size}×{size} "
                         "(crop them first)")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < h).clamp(-1, 1)


def _fix_channels(x: torch.Tensor, channels: int, where: str) -> torch.Tensor:
    """Float images ``[N, c, H, W]`` -> ``[N, channels, H, W]``: grey is
    replicated, RGB(A) is converted to luminance (ITU-R 601), alpha dropped."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 4 and channels == 3:
        return x[:, :3]
    if c == 1:
        return x.expand(-1, channels, -1, -1).contiguous()
    if c in (3, 4) and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
        return (x[:, :3] * w).sum(1, keepdim=True)
    raise InputError(f"{where}: images have {c} channels; cannot convert to data.channels = {channels}")


def _finish(images: torch.Tensor, labels: torch.Tensor, class_names: tuple[str, ...], config: Any,
            split: str, seed: int, where: str, captions: list[str] | None = None) -> ImageSet:
    idx = torch.from_numpy(_split_indices(images.shape[0], config, split, seed, where))
    images = _fix_channels(images[idx], config.channels, where)
    images = _resize(images, config.size, where)
    kept = None if captions is None else tuple(captions[int(i)] for i in idx)
    return ImageSet(images.float().contiguous(), labels[idx].long(), len(class_names), class_names, None, kept)


def _digits(config: Any, split: str, seed: int) -> ImageSet:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32)).unsqueeze(1) / 16.0 * 2 - 1  # [1797, 1, 8, 8]
    labels = torch.from_numpy(d.target.astype(np.int64))
    idx = torch.from_numpy(_split_indices(x.shape[0], config, split, seed, "digits"))
    x = F.interpolate(x[idx], size=(config.size, config.size), mode="bilinear", align_corners=False).clamp(-1, 1)
    x = x.expand(-1, config.channels, -1, -1).contiguous()
    return ImageSet(x.float(), labels[idx], 10, tuple(str(i) for i in range(10)), None)


def _folder(config: Any, split: str, seed: int) -> ImageSet:
    from PIL import Image, UnidentifiedImageError

    if not config.path:
        raise ConfigError(["data.path: the folder data set needs path = '<dir>/<class>/<image>.png'"])
    root = Path(config.path).expanduser()
    if not root.exists():
        raise InputError(f"folder data set: no such directory: {root}")
    if not root.is_dir():
        raise InputError(f"folder data set: {root} is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputError(f"folder data set: {root} has no class sub-folders (expected {root}/<class>/<image>.png)")
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not found:
            raise InputError(f"folder data set: class folder {root / name} holds no images "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
        files.extend((p, label) for p in found)
    mode = "L" if config.channels == 1 else "RGB"
    arrays, first = [], None
    notes: dict[str, list[Path]] = {}
    for p, _ in files:
        try:
            with Image.open(p) as im:
                arr, note = read_image(im, mode, where=str(p))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise InputError(f"folder data set: cannot read image {p}: {exc}") from None
        if note:
            notes.setdefault(note, []).append(p)
        if first is None:
            first = (p, arr.shape[:2])
        elif arr.shape[:2] != first[1]:
            raise InputError(f"folder data set: mixed image sizes — {p} is {arr.shape[1]}×{arr.shape[0]} "
                             f"but {first[0]} is {first[1][1]}×{first[1][0]} (resize them to one size)")
        arrays.append(arr.reshape(arr.shape[0], arr.shape[1], -1))
    for note, paths in notes.items():  # one line per kind of conversion, not one per image
        print(f"[tokenloom] note: folder data set {root}: {len(paths)} image{'' if len(paths) == 1 else 's'} "
              f"{note} (e.g. {paths[0].relative_to(root)})", file=sys.stderr, flush=True)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1  # [N, C, H, W]
    labels = torch.tensor([label for _, label in files], dtype=torch.long)
    captions = read_metadata_captions(root, [p for p, _ in files])
    return _finish(x, labels, tuple(classes), config, split, seed, f"folder data set {root}", captions)


def _npz(config: Any, split: str, seed: int) -> ImageSet:
    if not config.path:
        raise ConfigError(["data.path: the npz data set needs path = '<file>.npz'"])
    path = Path(config.path).expanduser()
    if not path.is_file():
        raise InputError(f"npz data set: no such file: {path}")
    import zipfile

    if not zipfile.is_zipfile(path):  # np.load would take any other file for a pickle
        raise InputError(f"npz data set: cannot read {path}: not an .npz file (not a zip archive of arrays; "
                         "write one with numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as exc:
        if "pickle" not in str(exc):
            raise InputError(f"npz data set: cannot read {path}: {exc}") from None
        raise InputError(f"npz data set: {path} holds pickled Python objects, which tokenloom never loads "
                         "(they can run code): store plain arrays (uint8/float images, integer labels, "
                         "string class_names)") from None
    except Exception as exc:  # noqa: BLE001 - numpy raises many kinds for a bad archive
        raise InputError(f"npz data set: cannot read {path}: {exc}") from None
    where = f"{path}['images']"
    if "images" not in arrays:
        raise InputError(f"npz data set: {path} has no array 'images' (found: {', '.join(arrays) or 'none'})")
    a = arrays["images"]
    if a.dtype == np.uint8:
        if a.ndim == 3:
            a = a[..., None]
        if a.ndim != 4:
            raise InputError(f"{where}: uint8 images must be [N, H, W, C] or [N, H, W], got shape {a.shape}")
        x = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float() / 127.5 - 1
    elif a.dtype in (np.float16, np.float32, np.float64):
        if a.ndim != 4:
            raise InputError(f"{where}: float images must be [N, C, H, W] in [-1, 1], got shape {a.shape}")
        if not np.isfinite(a).all():
            raise InputError(f"{where}: contains NaN or infinite values")
        lo, hi = float(a.min(initial=0.0)), float(a.max(initial=0.0))
        if lo < -1 - 1e-5 or hi > 1 + 1e-5:
            raise InputError(f"{where}: float images must lie in [-1, 1], got range [{lo:.3g}, {hi:.3g}] "
                             "(store 0..255 data as uint8 [N, H, W, C])")
        x = torch.from_numpy(a.astype(np.float32)).clamp(-1, 1)
    else:
        raise InputError(f"{where}: dtype {a.dtype} not supported — use uint8 [N, H, W, C] in 0..255 "
                         "or float32 [N, C, H, W] in [-1, 1]")
    if x.shape[0] == 0:
        raise InputError(f"{where}: holds no images")
    if x.shape[1] not in (1, 3, 4):
        raise InputError(f"{where}: expected 1, 3 or 4 channels, got shape {a.shape}")
    n = x.shape[0]
    if "labels" in arrays:
        lab = arrays["labels"]
        if lab.dtype.kind not in "iu" or lab.ndim != 1 or lab.shape[0] != n:
            raise InputError(f"{path}['labels']: expected integers [N={n}], got {lab.dtype} {lab.shape}")
        if lab.min() < 0:
            raise InputError(f"{path}['labels']: labels must be >= 0, got {int(lab.min())}")
        top = int(lab.max())
        n_names = arrays["class_names"].size if "class_names" in arrays else None
        if n_names is not None and top >= n_names:
            raise InputError(f"{path}['labels']: label {top} is out of range for the {n_names} class_names "
                             f"(labels must be 0..{n_names - 1})")
        if n_names is None and top >= MAX_CLASSES:
            raise InputError(f"{path}['labels']: label {top} would make {top + 1} classes (at most {MAX_CLASSES} "
                             "without class_names): relabel the classes 0..K-1, or give 'class_names'")
        labels = torch.from_numpy(lab.astype(np.int64))
        n_classes = top + 1
    else:
        labels, n_classes = torch.zeros(n, dtype=torch.long), 1
    if "class_names" in arrays:
        cn = arrays["class_names"]
        if cn.dtype.kind not in "UiuS" or cn.size == 0:
            raise InputError(f"{path}['class_names']: expected a non-empty array of strings, got {cn.dtype} "
                             f"{cn.shape}")
        if cn.size > max(MAX_CLASSES, n):
            raise InputError(f"{path}['class_names']: {cn.size} names is more than the {max(MAX_CLASSES, n)} "
                             "allowed")
        names = tuple(str(s) for s in cn.reshape(-1))
    else:
        names = tuple(str(i) for i in range(n_classes))
    return _finish(x, labels, names, config, split, seed, f"npz data set {path}")


# ---------------------------------------------------------------------------


def _hf(config: Any, split: str, seed: int) -> ImageSet:
    return load_hf(config, split, seed)


_LOADERS = {"shapes": _shapes, "digits": _digits, "folder": _folder, "npz": _npz, "hf": _hf}


def load_dataset(config: Any, *, split: str = "train", seed: int = 0) -> ImageSet:
    """Load the data set a :class:`~tokenloom.config.DataConfig` describes.

    ``split`` is ``"train"`` (``config.n`` images) or ``"holdout"``
    (``config.n_holdout`` images, disjoint from train). The result depends
    only on ``(config, split, seed)``."""
    if split not in SPLITS:
        raise ConfigError([f"split: must be one of {', '.join(SPLITS)}, got {split!r}"])
    loader = _LOADERS.get(config.name)
    if loader is None:
        import difflib

        close = difflib.get_close_matches(str(config.name), DATASETS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError([f"data.name: unknown data set {config.name!r} ({hint}available: {', '.join(DATASETS)})"])
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError([f"seed: expected a non-negative int, got {seed!r}"])
    if getattr(config, "holdout_combos", ()) and config.name != "shapes":
        raise ConfigError([(f"data.holdout_combos: only the shapes data set knows its images' attributes, not "
                           f"{config.name!r}")])
    return loader(config, split, seed)


def open_dataset(config: Any, *, split: str = "train", seed: int = 0) -> ImageSet | StreamSet:
    """The data set ``config`` describes: a :class:`StreamSet` for ``folder`` and ``hf`` (images
    read lazily), the in-memory :class:`~tokenloom.data.ImageSet` of the built-ins."""
    if split not in SPLITS:
        raise ConfigError([f"split: must be one of {', '.join(SPLITS)}, got {split!r}"])
    if config.name not in STREAMED:
        if getattr(config, "flip", False):
            raise ConfigError([(f"data.flip: only the streamed data sets ({', '.join(STREAMED)}) flip images, "
                               f"not {config.name!r}")])
        return load_dataset(config, split=split, seed=seed)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError([f"seed: expected a non-negative int, got {seed!r}"])
    return open_streamed(config, split, seed)


__all__ = [
    "ALPHA_BACKGROUND",
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "MAX_CLASSES",
    "SHAPES_BACKGROUND",
    "SHAPES_CAPTION_TEMPLATES",
    "SHAPES_COLOURS",
    "SHAPES_RULES",
    "SHAPE_CLASSES",
    "SHAPE_FILL_RATIO",
    "ImageSet",
    "combo_matches",
    "load_dataset",
    "open_dataset",
    "parse_caption",
    "parse_combo",
    "parse_shapes",
    "read_image",
    "read_metadata_captions",
    "render_shapes",
    "shape_regions",
    "shapes_attributes",
    "shapes_caption",
]
