"""The code store: a training set encoded once per tokenizer, in sharded memory-mapped arrays.

Modelled on LlamaGen's ``extract_codes``: the tokenizer runs over every image once, and backbone
training reads codes, never images. A store is a directory ``cache/codes-<key>/`` (the key:
:func:`tokenloom.running.cache.codes_key`, the tokenizer's identity × the images'):

- ``store.json`` — the key, the tokenizer's hash and each split's layout: rows ``n``, row shape
  (``[L]`` codes or ``[L, D]`` continuous latents), dtype, rows per shard;
- ``<split>-<i>.npy`` — shard ``i`` of a split (rows ``i·S .. (i+1)·S - 1``), a plain numpy
  ``.npy`` file: ``uint16`` codes when the vocabulary fits (V ≤ 65 536), else ``int32``;
  ``float32`` (or ``float16``) latents for continuous tokenizers.

Each shard is written to a temporary name and renamed into place (atomic), so a shard is either
whole or absent; a killed job leaves at most temporary files, removed when the store is opened
again, and only the missing shards are encoded (resumable shard by shard). A shard whose size
does not match its header (truncated by a copy, a full disk) is detected, reported and redone.
``store.json`` written for another key (another tokenizer, other images) is detected: the store
is refused (:class:`~tokenloom.errors.CheckpointError`) or, where the caller allows it, cleared
and written again. Several processes (torchrun) encode disjoint shards — rank ``r`` of ``w`` the
missing shards ``r::w`` — and every rank then reads the whole store.

:meth:`CodeStore.read` gives a :class:`CodeArray`: ``codes[idx]`` (a LongTensor of rows) reads
those rows from the memory-mapped shards, so backbone training indexes it like the
``LongTensor[N, L]`` it replaces without holding the set in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..contract.errors import CheckpointError

#: Rows per shard (a LlamaGen-B ImageNet store: 1.28 M rows of 256 codes -> 79 shards of 8 MB).
SHARD_ROWS = 16384
STORE_FILE = "store.json"
FORMAT = 1


def code_dtype(vocab_size: int | None, *, continuous: bool = False, latent_dtype: str = "float32") -> str:
    """The numpy dtype a store keeps codes in: ``uint16`` when every code fits, else ``int32``;
    ``latent_dtype`` (``float32``/``float16``) for continuous latents."""
    if continuous:
        if latent_dtype not in ("float32", "float16"):
            raise ValueError(f"latent_dtype must be float32 or float16, got {latent_dtype!r}")
        return latent_dtype
    if vocab_size is None or vocab_size > 2**31 - 1:
        raise ValueError(f"vocab_size {vocab_size} does not fit in int32")
    return "uint16" if vocab_size <= 2**16 else "int32"


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


class CodeArray:
    """A split's codes ``[N, L]`` (or latents ``[N, L, D]``) in memory-mapped shards, indexed like a
    tensor: ``codes[i]``, ``codes[a:b]``, ``codes[idx]`` return torch tensors (``long`` codes,
    ``float32`` latents) on the array's device. ``to(device)`` says where rows go; nothing is read
    until indexed. :meth:`tensor` reads the whole split."""

    def __init__(self, shards: list[np.ndarray], shard_rows: int, n: int, row_shape: tuple[int, ...],
                 dtype: str, device: Any = None) -> None:
        self.shards, self.shard_rows, self.n = shards, int(shard_rows), int(n)
        self.row_shape, self.np_dtype = tuple(row_shape), dtype
        self.device = None if device is None else torch.device(device)

    @property
    def continuous(self) -> bool:
        return self.np_dtype.startswith("float")

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n, *self.row_shape))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.continuous else torch.long

    def dim(self) -> int:
        return 1 + len(self.row_shape)

    def __len__(self) -> int:
        return self.n

    def to(self, device: Any = None, *args: Any, **kwargs: Any) -> CodeArray:
        return CodeArray(self.shards, self.shard_rows, self.n, self.row_shape, self.np_dtype, device)

    def _rows(self, rows: np.ndarray) -> torch.Tensor:
        out = np.empty((rows.shape[0], *self.row_shape), dtype=self.np_dtype)
        shard = rows // self.shard_rows
        for s in np.unique(shard):
            pick = shard == s
            out[pick] = self.shards[int(s)][rows[pick] - int(s) * self.shard_rows]
        t = torch.from_numpy(out.astype(np.float32 if self.continuous else np.int64))
        return t if self.device is None else t.to(self.device)

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, (int, np.integer)) or (torch.is_tensor(key) and key.dim() == 0):
            i = int(key)
            if not -self.n <= i < self.n:
                raise IndexError(f"row {i} out of range for {self.n} rows")
            return self._rows(np.array([i % self.n]))[0]
        if isinstance(key, slice):
            rows = np.arange(self.n)[key]
        else:
            rows = np.asarray(key.detach().cpu().numpy() if torch.is_tensor(key) else key, dtype=np.int64)
            if rows.size and (rows.min() < -self.n or rows.max() >= self.n):
                raise IndexError(f"row index out of range for {self.n} rows")
            rows = rows % max(self.n, 1)
        return self._rows(rows.reshape(-1)).reshape(*rows.shape, *self.row_shape)

    def tensor(self) -> torch.Tensor:
        """The whole split in memory."""
        return self[0 : self.n]

    def __repr__(self) -> str:
        return f"CodeArray(shape={tuple(self.shape)}, dtype={self.np_dtype}, shards={len(self.shards)})"


class CodeStore:
    """The store in directory ``root`` for ``key`` (see the module docstring)."""

    def __init__(self, root: str | Path, key: str) -> None:
        self.root, self.key = Path(root), str(key)

    # -- layout ------------------------------------------------------------

    def meta(self) -> dict | None:
        """``store.json``, or None when absent or unreadable."""
        try:
            return json.loads((self.root / STORE_FILE).read_text())
        except (OSError, ValueError):
            return None

    def prepare(self, splits: dict[str, dict], *, tokenizer: str = "", overwrite: bool = False,
                shard_rows: int | None = None) -> None:
        """Create the store for ``splits`` (``{split: {"n", "row_shape", "dtype"}}``) or check the
        existing one. A store of another key (or layout) is a CheckpointError, unless ``overwrite``:
        then it is cleared, with a note. Temporary files of killed writers are removed.
        ``shard_rows``: rows per shard of a new store (default :data:`SHARD_ROWS`)."""
        want = {"format": FORMAT, "key": self.key, "tokenizer": tokenizer,
                "shard_rows": int(shard_rows or SHARD_ROWS),
                "splits": {k: {"n": int(v["n"]), "row_shape": [int(d) for d in v["row_shape"]],
                               "dtype": str(v["dtype"])} for k, v in splits.items()}}
        have = self.meta()
        if have is not None:
            same = have.get("key") == self.key and have.get("splits") == want["splits"] \
                and have.get("format") == FORMAT
            if not same:
                what = (f"key {str(have.get('key'))[:12]} != {self.key[:12]}" if have.get("key") != self.key
                        else "another layout")
                msg = f"code store {self.root} was written for another tokenizer or other images ({what})"
                if not overwrite:
                    raise CheckpointError(f"{msg}; delete it or use another directory")
                print(f"[tokenloom] warning: {msg}: encoding again", file=sys.stderr, flush=True)
                shutil.rmtree(self.root)
                have = None
        self.root.mkdir(parents=True, exist_ok=True)
        for tmp in self.root.glob("*.tmp*"):  # a writer killed mid-shard
            tmp.unlink(missing_ok=True)
        if have is None:
            _atomic_json(self.root / STORE_FILE, {**want, "complete": False})

    def _split(self, split: str) -> dict:
        meta = self.meta()
        if meta is None or split not in meta.get("splits", {}):
            raise CheckpointError(f"code store {self.root}: no split {split!r}")
        return {**meta["splits"][split], "shard_rows": meta["shard_rows"]}

    def n_shards(self, split: str) -> int:
        s = self._split(split)
        return -(-s["n"] // s["shard_rows"])

    def rows(self, split: str, i: int) -> tuple[int, int]:
        """The row range ``[a, b)`` shard ``i`` of ``split`` holds."""
        s = self._split(split)
        a = i * s["shard_rows"]
        return a, min(a + s["shard_rows"], s["n"])

    def shard_path(self, split: str, i: int) -> Path:
        return self.root / f"{split}-{i:05d}.npy"

    def shard_ok(self, split: str, i: int) -> bool:
        """Whether shard ``i`` is whole: present, its header the expected shape and dtype and its
        size what the header implies. A bad shard is reported and removed."""
        path = self.shard_path(split, i)
        if not path.is_file():
            return False
        s = self._split(split)
        a, b = self.rows(split, i)
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            ok = arr.shape == (b - a, *s["row_shape"]) and str(arr.dtype) == s["dtype"]
            del arr
        except (OSError, ValueError) as exc:
            ok, reason = False, str(exc)
        else:
            reason = "wrong shape or dtype"
        if not ok:
            print(f"[tokenloom] warning: code store shard {path.name} is damaged ({reason}): encoding it again",
                  file=sys.stderr, flush=True)
            path.unlink(missing_ok=True)
        return ok

    def missing(self) -> list[tuple[str, int]]:
        """The shards still to encode, ``(split, i)`` in order."""
        meta = self.meta() or {}
        return [(split, i) for split in meta.get("splits", {}) for i in range(self.n_shards(split))
                if not self.shard_ok(split, i)]

    def write_shard(self, split: str, i: int, array: np.ndarray) -> None:
        """Write shard ``i`` of ``split`` atomically (checked against the layout)."""
        s = self._split(split)
        a, b = self.rows(split, i)
        want = (b - a, *s["row_shape"])
        if tuple(array.shape) != want:
            raise ValueError(f"shard {split}-{i}: expected shape {want}, got {tuple(array.shape)}")
        _atomic_save(self.shard_path(split, i), np.ascontiguousarray(array.astype(s["dtype"], copy=False)))

    def finish(self) -> None:
        """Mark the store complete (every shard written)."""
        meta = self.meta() or {}
        if not meta.get("complete"):
            _atomic_json(self.root / STORE_FILE, {**meta, "complete": True})

    def complete(self) -> bool:
        meta = self.meta()
        return bool(meta and meta.get("key") == self.key and meta.get("complete"))

    def read(self, split: str) -> CodeArray:
        """``split`` as a :class:`CodeArray` over memory-mapped shards."""
        s = self._split(split)
        shards = [np.load(self.shard_path(split, i), mmap_mode="r", allow_pickle=False)
                  for i in range(self.n_shards(split))]
        return CodeArray(shards, s["shard_rows"], s["n"], tuple(s["row_shape"]), s["dtype"])


def encode_shards(store: CodeStore, todo: Iterable[tuple[str, int]], encode: Callable[[str, int, int], np.ndarray],
                  *, rank: int = 0, world: int = 1) -> list[tuple[str, int]]:
    """Encode this process's share ``todo[rank::world]`` of the missing shards: ``encode(split, a,
    b)`` gives rows ``a..b-1``; each shard is written as soon as it is done. Returns the shards
    written."""
    mine = list(todo)[rank::world]
    for split, i in mine:
        a, b = store.rows(split, i)
        store.write_shard(split, i, encode(split, a, b))
    return mine


__all__ = ["SHARD_ROWS", "CodeArray", "CodeStore", "code_dtype", "encode_shards"]
