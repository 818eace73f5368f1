"""Streamed data sets: images read lazily, decoded by DataLoader worker processes.

:func:`tokenloom.data.open_dataset` is :func:`tokenloom.data.load_dataset` for sets that do not fit in
memory. For
``folder`` (the ImageNet ``train/<class>/<image>`` layout, captions from ``metadata.jsonl`` as in
memory) and ``hf`` (a Hugging Face ``datasets`` directory on local disk: ``save_to_disk``'s,
or ``.arrow``/``.parquet`` files with an image column; never a download) it returns a
:class:`StreamSet`: labels, class names and captions in memory, the images a :class:`LazyImages`
that reads them from disk when indexed. The built-ins (``shapes``, ``digits``, ``npz``) are small
and come back in memory as an :class:`~tokenloom.data.ImageSet`; both have ``images``, ``labels``,
``n_classes``, ``class_names``, ``captions``, ``attributes`` and ``len()``.

Every image is preprocessed alone (:func:`prepare_image`), so a streamed set gives the images
the in-memory loader gives: read faithfully (:func:`tokenloom.data.read_image`), centre-cropped
to a square, resized to ``size`` — ``[data] resize = "bilinear"`` (the default, bilinear with
antialiasing when shrinking, exactly the in-memory ``folder``'s) or ``"adm"`` (ADM's
``center_crop_arr`` as LlamaGen and VAR preprocess ImageNet: box-filter halving while the short
side is at least twice the target, bicubic resize of the short side, centre crop). Optional
random horizontal flips (``[data] flip``) of the images a tokenizer is fitted on.

Bad input: a folder is scanned once when opened (headers and PNG checksums, no decoding): a file
that is not a readable image is an :class:`~tokenloom.errors.InputError` naming it, or with
``[data] unreadable = "skip"`` it is left out and one note counts them and names the first few.
Images smaller than ``size`` are upscaled and one warning counts them (``[data] small =
"error"`` refuses them). An ``hf`` directory without an image column is one InputError naming the
path and the columns it has; an ``hf`` row that does not decode is an InputError naming the row
when it is read (its set is not scanned ahead: that would decode everything).

Memory: a streamed set holds its file names as one numpy byte array and its labels as one
array (no per-image Python objects, so forked workers do not copy them page by page); peak
memory does not grow with the number of images (bench/memory.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
import torch.nn.functional as F

from ..contract.errors import ConfigError, InputError
from .imagefiles import (
    IMAGE_EXTENSIONS,
    ImageSet,
    read_image,
    read_metadata_captions,
    split_indices,
)

#: The data sets that stream from disk (the others are built in memory).
STREAMED: tuple[str, ...] = ("folder", "hf")
#: How many file names an error or note lists.
FIRST_NAMES = 3


# ---------------------------------------------------------------------------
# One image
# ---------------------------------------------------------------------------


def center_crop_arr(pil_image: Any, image_size: int) -> Any:
    """ADM's centre crop (guided-diffusion ``image_datasets.py``, used by LlamaGen and VAR): halve
    with a box filter while the short side is at least ``2 · image_size``, resize the short side
    to ``image_size`` bicubically, crop the centre square."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top : top + image_size, left : left + image_size])


def prepare_image(arr: np.ndarray, size: int, resize: str = "bilinear") -> torch.Tensor:
    """``uint8 [H, W, C]`` -> ``FloatTensor[C, size, size]`` in [-1, 1]: centre-cropped to a
    square and resized (``resize``: ``"bilinear"`` or ``"adm"``, see the module docstring)."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if resize == "adm":
        from PIL import Image

        im = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
        out = np.asarray(center_crop_arr(im, size)).reshape(size, size, arr.shape[2])
        return torch.from_numpy(np.require(out, requirements=["C", "W"])).permute(2, 0, 1).float() / 127.5 - 1
    h, w = arr.shape[:2]
    s = min(h, w)
    if h != w:
        top, left = (h - s) // 2, (w - s) // 2
        arr = arr[top : top + s, left : left + s]
    x = torch.from_numpy(np.require(arr, requirements=["C", "W"])).permute(2, 0, 1).float() / 127.5 - 1
    if s != size:
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False,
                          antialias=size < s).clamp(-1, 1)[0]
    return x


# ---------------------------------------------------------------------------
# Sources: what reads image i
# ---------------------------------------------------------------------------


class FolderSource:
    """The images of a folder data set: ``root`` and the relative file names (a numpy byte
    array), decoded and prepared one at a time. Picklable (DataLoader workers)."""

    def __init__(self, root: Path, files: np.ndarray, *, channels: int, size: int, resize: str,
                 identity: str) -> None:
        self.root, self.files = Path(root), files
        self.mode = "L" if channels == 1 else "RGB"
        self.channels, self.size, self.resize, self._identity = channels, size, resize, identity

    def __len__(self) -> int:
        return int(self.files.shape[0])

    def name(self, i: int) -> str:
        return os.fsdecode(self.files[i])

    def read(self, i: int) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        path = self.root / self.name(i)
        try:
            with Image.open(path) as im:
                arr, _ = read_image(im, self.mode, where=str(path))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise InputError(f"folder data set: cannot read image {path}: {exc} "
                             "(set [data] unreadable = \"skip\" to leave such images out)") from None
        return prepare_image(arr, self.size, self.resize)

    def identity(self) -> dict:
        return {"kind": "folder", "root": str(self.root.resolve()), "files": self._identity,
                "size": self.size, "channels": self.channels, "resize": self.resize}


class HFSource:
    """The images of a Hugging Face ``datasets`` directory: rows ``rows`` of its image column,
    opened lazily in each process (the arrow files are memory-mapped, not read)."""

    def __init__(self, path: Path, column: str, rows: np.ndarray, *, channels: int, size: int, resize: str,
                 small: str, fingerprint: str) -> None:
        self.path, self.column, self.rows = Path(path), column, rows
        self.mode = "L" if channels == 1 else "RGB"
        self.channels, self.size, self.resize, self.small = channels, size, resize, small
        self.fingerprint = fingerprint
        self._ds: Any = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_ds"] = None  # each worker opens (memory-maps) the files itself
        return state

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def _dataset(self) -> Any:
        if self._ds is None:
            self._ds = open_hf(self.path).select_columns([self.column])
        return self._ds

    def read(self, i: int) -> torch.Tensor:
        row = int(self.rows[i])
        where = f"hf data set {self.path}, row {row}, column {self.column!r}"
        try:
            value = self._dataset()[row][self.column]
            im = _as_pil(value, where)
            arr, _ = read_image(im, self.mode, where=where)
        except InputError:
            raise
        except (OSError, ValueError, TypeError) as exc:
            raise InputError(f"{where}: cannot read the image: {exc}") from None
        if self.small == "error" and min(arr.shape[:2]) < self.size:
            raise InputError(f"{where}: the image is {arr.shape[1]}×{arr.shape[0]}, smaller than data.size = "
                             f"{self.size} (set [data] small = \"upscale\" to upscale such images)")
        return prepare_image(arr, self.size, self.resize)

    def identity(self) -> dict:
        return {"kind": "hf", "path": str(self.path.resolve()), "column": self.column,
                "fingerprint": self.fingerprint, "rows": hashlib.sha256(self.rows.tobytes()).hexdigest(),
                "size": self.size, "channels": self.channels, "resize": self.resize}


def _as_pil(value: Any, where: str) -> Any:
    import io

    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        if value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"]))
        return Image.open(value["path"])
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    raise InputError(f"{where}: not an image (got {type(value).__name__})")


class SourceDataset(torch.utils.data.Dataset):
    """A map-style torch data set over a source: item ``i`` is image ``i``; item ``~i`` (a
    negative index) is image ``i`` flipped horizontally."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> torch.Tensor:
        i = int(i)
        return self.source.read(~i).flip(-1) if i < 0 else self.source.read(i)


class LazyImages:
    """Images ``[N, C, H, W]`` (float32 in [-1, 1]) read from disk when indexed: ``x[i]``,
    ``x[a:b]`` and ``x[idx]`` (a LongTensor or list) read those images in this process;
    :meth:`batches` reads many through a DataLoader with ``workers`` worker processes. It has
    ``shape``, ``len()`` and ``to(device)`` like the tensor it stands for."""

    def __init__(self, source: Any, *, workers: int = 2, flip: bool = False, device: Any = None) -> None:
        self.source, self.workers, self.flip = source, int(workers), bool(flip)
        self.device = None if device is None else torch.device(device)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.source), self.source.channels, self.source.size, self.source.size))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def dim(self) -> int:
        return 4

    def __len__(self) -> int:
        return len(self.source)

    def to(self, device: Any = None, *args: Any, **kwargs: Any) -> LazyImages:
        return LazyImages(self.source, workers=self.workers, flip=self.flip, device=device)

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.device is None else x.to(self.device)

    def __getitem__(self, key: Any) -> torch.Tensor:
        n = len(self)
        if isinstance(key, (int, np.integer)) or (torch.is_tensor(key) and key.dim() == 0):
            i = int(key)
            if not -n <= i < n:
                raise IndexError(f"image {i} out of range for {n} images")
            return self._out(self.source.read(i % n))
        if isinstance(key, slice):
            rows = range(*key.indices(n))
        else:
            rows = [int(i) % n for i in (key.tolist() if hasattr(key, "tolist") else key)]
        if len(rows) == 0:
            return self._out(torch.empty(0, *self.shape[1:]))
        return self._out(torch.stack([self.source.read(i) for i in rows]))

    def batches(self, index_batches: Iterable[list[int]], *, workers: int | None = None) -> Iterator[torch.Tensor]:
        """The images of each list of indices in ``index_batches`` (``~i``: image ``i`` flipped),
        in order, decoded by a DataLoader's worker processes (prefetching two batches each)."""
        w = self.workers if workers is None else int(workers)
        loader = torch.utils.data.DataLoader(
            SourceDataset(self.source), batch_sampler=index_batches, num_workers=w,
            prefetch_factor=2 if w > 0 else None, persistent_workers=False)
        try:
            for x in loader:
                yield self._out(x)
        except InputError as exc:  # a worker's error comes back wrapped in its traceback: keep the message
            raise InputError(_worker_message(str(exc))) from None

    def identity(self) -> dict:
        """What identifies these images (a training run's key hashes it instead of the pixels)."""
        return {**self.source.identity(), "flip": self.flip}

    def materialize(self) -> torch.Tensor:
        """Every image in one tensor (small sets: the held-out split)."""
        n = len(self)
        if n == 0:
            return torch.empty(0, *self.shape[1:])
        bs = 64
        parts = list(self.batches([list(range(i, min(i + bs, n))) for i in range(0, n, bs)],
                                  workers=min(self.workers, max(0, (n - 1) // bs))))
        return torch.cat(parts).float().contiguous()


def _worker_message(text: str) -> str:
    """The original message of an error a DataLoader worker raised (torch re-raises it in the main
    process with the worker's traceback in front)."""
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().rsplit("\n", 1)[-1]
    _, sep, message = last.partition("Error: ")
    return message if sep else last


def is_lazy(images: Any) -> bool:
    """Whether ``images`` are streamed (a :class:`LazyImages`) rather than a tensor."""
    return isinstance(images, LazyImages)


@attrs.frozen
class StreamSet:
    """A data set whose images stream from disk: ``images`` (:class:`LazyImages`), ``labels``
    (``LongTensor[N]``), ``n_classes``, ``class_names``, ``captions`` (or None) — the fields of an
    :class:`~tokenloom.data.ImageSet`, which :meth:`materialize` returns."""

    images: LazyImages
    labels: torch.Tensor
    n_classes: int
    class_names: tuple[str, ...]
    captions: tuple[str, ...] | None = None
    attributes: list[dict] | None = None
    holdout_combos: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.images)

    def materialize(self) -> ImageSet:
        """The same set in memory."""
        return ImageSet(self.images.materialize(), self.labels, self.n_classes, self.class_names, None,
                        self.captions)


# ---------------------------------------------------------------------------
# folder
# ---------------------------------------------------------------------------


def _names(paths: list[str]) -> str:
    more = f" and {len(paths) - FIRST_NAMES} more" if len(paths) > FIRST_NAMES else ""
    return ", ".join(paths[:FIRST_NAMES]) + more


#: Folder scans of this process, by root, options and the class folders' modification times (a
#: run opens the training and held-out splits of one folder: it is scanned once).
_SCANS: dict[tuple, tuple] = {}


def scan_folder(config: Any) -> tuple[Path, np.ndarray, np.ndarray, tuple[str, ...], str]:
    """Every image of a folder data set, checked without decoding: its root, the relative file
    names (numpy bytes), the labels, the class names and a hash of names, sizes and mtimes.
    Unreadable files and images smaller than ``size`` are handled as ``[data] unreadable`` and
    ``small`` say (see the module docstring). Remembered for the process while no file is
    added, removed or changed (checked by ``stat``)."""
    if config.path and Path(config.path).expanduser().is_dir():
        root = Path(config.path).expanduser()
        try:
            stamp = tuple(sorted((e.name, e.stat().st_mtime_ns) for e in os.scandir(root) if e.is_dir()))
        except OSError:
            stamp = None
        key = (str(root.resolve()), config.size, config.unreadable, config.small, stamp)
        if stamp is not None and key in _SCANS and _stat_digest(root, _SCANS[key][1]) == _SCANS[key][4]:
            return _SCANS[key]  # the same files, sizes and modification times: no need to open them again
        found = _scan_folder(config)
        if stamp is not None:
            _SCANS.clear()  # one folder at a time: the names of a large one are megabytes
            _SCANS[key] = found
        return found
    return _scan_folder(config)


def _stat_digest(root: Path, files: np.ndarray) -> str | None:
    """The scan's hash of ``files`` (names, sizes, modification times) from ``stat`` alone; None
    when one is gone."""
    h = hashlib.sha256()
    try:
        for f in files:
            rel = os.fsdecode(f)
            st = os.stat(os.path.join(root, rel))
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    except OSError:
        return None
    return h.hexdigest()


def _scan_folder(config: Any) -> tuple[Path, np.ndarray, np.ndarray, tuple[str, ...], str]:
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
    names: list[np.ndarray] = []  # one array per class: no per-image Python objects outlive a class
    labels: list[np.ndarray] = []
    bad: list[str] = []
    small: list[str] = []
    h = hashlib.sha256()
    for label, cls in enumerate(classes):
        folder = os.path.join(root, cls)
        with os.scandir(folder) as it:
            found = sorted(e.name for e in it if e.is_file() and not e.name.startswith(".")
                           and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)
        if not found:
            raise InputError(f"folder data set: class folder {root / cls} holds no images "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
        kept: list[bytes] = []
        for fname in found:
            rel = f"{cls}/{fname}"
            path = os.path.join(folder, fname)
            try:
                with Image.open(path) as im:
                    w, hgt = im.size
                    im.verify()  # PNG: chunk checksums; others: the header
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
                if config.unreadable != "skip":
                    raise InputError(f"folder data set: cannot read image {path}: {exc} "
                                     "(set [data] unreadable = \"skip\" to leave such images out)") from None
                bad.append(rel)
                continue
            if min(w, hgt) < config.size:
                small.append(rel)
            st = os.stat(path)
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            kept.append(os.fsencode(rel))
        names.append(np.array(kept, dtype=bytes))
        labels.append(np.full(len(kept), label, dtype=np.int64))
        del found, kept
    if bad:
        print(f"[tokenloom] note: folder data set {root}: skipped {len(bad)} unreadable "
              f"image{'' if len(bad) == 1 else 's'} ({_names(bad)})", file=sys.stderr, flush=True)
    files = np.concatenate(names) if names else np.array([], dtype=bytes)
    if files.shape[0] == 0:
        raise InputError(f"folder data set: {root} has no readable images")
    if small:
        msg = (f"folder data set {root}: {len(small)} image{'' if len(small) == 1 else 's'} smaller than "
               f"data.size = {config.size} px ({_names(small)})")
        if config.small == "error":
            raise InputError(f"{msg}; resize them or set [data] small = \"upscale\"")
        warnings.warn(f"{msg}: upscaled", stacklevel=3)
    return root, files, np.concatenate(labels), tuple(classes), h.hexdigest()


def _open_folder(config: Any, split: str, seed: int) -> StreamSet:
    root, files, labels, classes, digest = scan_folder(config)
    where = f"folder data set {root}"
    idx = split_indices(len(files), config, split, seed, where)
    captions = None
    if (root / "metadata.jsonl").is_file():
        all_captions = read_metadata_captions(root, [root / os.fsdecode(f) for f in files])
        captions = tuple(all_captions[int(i)] for i in idx)
    source = FolderSource(root, files[idx], channels=config.channels, size=config.size, resize=config.resize,
                          identity=hashlib.sha256(f"{digest}:{idx.tobytes().hex()}".encode()).hexdigest())
    images = LazyImages(source, workers=config.workers, flip=config.flip and split == "train")
    return StreamSet(images, torch.from_numpy(labels[idx]), len(classes), classes, captions)


# ---------------------------------------------------------------------------
# hf: a Hugging Face datasets directory on local disk
# ---------------------------------------------------------------------------


def _require_datasets() -> Any:
    try:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only, never a download
        import datasets
    except ImportError:
        raise ConfigError([("data.name: the hf data set needs the Hugging Face 'datasets' package: "
                           "pip install 'tokenloom[datasets]'")]) from None
    return datasets


def open_hf(path: Path) -> Any:
    """The ``datasets.Dataset`` in the local directory ``path``: a ``save_to_disk`` directory
    (a DatasetDict gives its ``train`` split, else its only one), or ``.arrow`` files (memory-mapped)
    or ``.parquet`` files in it (converted once into the ``datasets`` cache, as
    ``Dataset.from_parquet`` does). Never downloads (``HF_DATASETS_OFFLINE=1``)."""
    datasets = _require_datasets()
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"hf data set: no such directory: {path}")
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() \
            or (path / "state.json").is_file():
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:  # noqa: BLE001 - datasets raises many kinds for a bad directory
            raise InputError(f"hf data set {path}: cannot load it with datasets.load_from_disk: {exc}") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" in ds:
                ds = ds["train"]
            elif len(ds) == 1:
                ds = next(iter(ds.values()))
            else:
                raise InputError(f"hf data set {path}: a DatasetDict with splits {', '.join(ds)} and no 'train': "
                                 "point data.path at one split's directory")
        return ds
    arrow = sorted(path.rglob("*.arrow")) if path.is_dir() else ([path] if path.suffix == ".arrow" else [])
    parquet = sorted(path.rglob("*.parquet")) if path.is_dir() else ([path] if path.suffix == ".parquet" else [])
    try:
        if arrow:
            parts = [datasets.Dataset.from_file(str(p)) for p in arrow]
            return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        if parquet:
            return datasets.Dataset.from_parquet([str(p) for p in parquet])
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"hf data set {path}: cannot read its files: {exc}") from None
    raise InputError(f"hf data set {path}: neither a datasets.save_to_disk directory nor .arrow/.parquet files")


def _columns(ds: Any, config: Any, path: Path) -> tuple[str, str | None, str | None]:
    import datasets

    features = ds.features
    cols = list(features)

    def named(option: str, value: str | None) -> str | None:
        if value is not None and value not in features:
            raise InputError(f"hf data set {path}: data.{option} = {value!r} is not a column "
                             f"(columns: {', '.join(cols) or 'none'})")
        return value

    image = named("image_column", config.image_column)
    if image is None:
        typed = [c for c in cols if isinstance(features[c], datasets.Image)]
        image = typed[0] if typed else next((c for c in ("image", "img", "jpg", "png") if c in features), None)
    if image is None:
        raise InputError(f"hf data set {path}: no image column (columns: {', '.join(cols) or 'none'}; "
                         "expected a datasets.Image feature or a column named 'image', or set data.image_column)")
    label = named("label_column", config.label_column)
    if label is None:
        label = next((c for c in ("label", "labels", "class", "cls") if c in features), None)
    caption = named("caption_column", config.caption_column)
    if caption is None:
        caption = next((c for c in ("text", "caption", "prompt") if c in features), None)
    return image, label, caption


def _open_hf(config: Any, split: str, seed: int) -> StreamSet:
    if not config.path:
        raise ConfigError(["data.path: the hf data set needs path = '<a datasets.save_to_disk directory>'"])
    path = Path(config.path).expanduser()
    ds = open_hf(path)
    image, label_col, caption_col = _columns(ds, config, path)
    n = len(ds)
    if n == 0:
        raise InputError(f"hf data set {path}: holds no rows")
    where = f"hf data set {path}"
    idx = split_indices(n, config, split, seed, where)
    if label_col is not None:
        raw = np.asarray(ds.select_columns([label_col]).with_format("numpy")[label_col])
        if raw.dtype.kind not in "iu" or raw.ndim != 1:
            raise InputError(f"{where}: label column {label_col!r} must hold integers, got {raw.dtype}")
        if raw.size and raw.min() < 0:
            raise InputError(f"{where}: label column {label_col!r} has a negative label {int(raw.min())}")
        feature = ds.features[label_col]
        import datasets

        if isinstance(feature, datasets.ClassLabel):
            names = tuple(feature.names)
        else:
            names = tuple(str(i) for i in range(int(raw.max()) + 1 if raw.size else 1))
        labels = torch.from_numpy(raw[idx].astype(np.int64))
    else:
        names, labels = ("0",), torch.zeros(len(idx), dtype=torch.long)
    captions = None
    if caption_col is not None:
        texts = ds.select_columns([caption_col])[caption_col]
        captions = tuple(str(texts[int(i)]) for i in idx)
    source = HFSource(path, image, idx.astype(np.int64), channels=config.channels, size=config.size,
                      resize=config.resize, small=config.small, fingerprint=str(getattr(ds, "_fingerprint", "")))
    images = LazyImages(source, workers=config.workers, flip=config.flip and split == "train")
    return StreamSet(images, labels, len(names), names, captions)


# ---------------------------------------------------------------------------


def open_streamed(config: Any, split: str, seed: int) -> StreamSet:
    """The streamed ``folder`` or ``hf`` set of ``config`` (:func:`tokenloom.data.open_dataset`
    checks the arguments and opens the built-ins)."""
    return _open_folder(config, split, seed) if config.name == "folder" else _open_hf(config, split, seed)


def load_hf(config: Any, split: str, seed: int) -> ImageSet:
    """The ``hf`` data set in memory (:func:`tokenloom.data.load_dataset`'s loader for it)."""
    return _open_hf(config, split, seed).materialize()


def dataset_identity(data: Any) -> str:
    """A short hash of what a data set's images are (a stream's files, or a tensor's bytes)."""
    if is_lazy(data.images):
        return hashlib.sha256(json.dumps(data.images.identity(), sort_keys=True).encode()).hexdigest()[:16]
    return hashlib.sha256(data.images.contiguous().numpy().tobytes()).hexdigest()[:16]


__all__ = [
    "STREAMED",
    "FolderSource",
    "HFSource",
    "LazyImages",
    "SourceDataset",
    "StreamSet",
    "center_crop_arr",
    "dataset_identity",
    "is_lazy",
    "open_hf",
    "open_streamed",
    "prepare_image",
    "scan_folder",
]
