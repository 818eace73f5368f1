"""Atomic, hash-checked checkpoints.

Every file tokenloom writes goes through :func:`atomic_write` (a temporary
file in the same directory, fsync, then ``os.replace``), so a killed process
never leaves a half-written file. Component checkpoints are safetensors files
whose metadata carries the component kind, name, its config table and a
SHA-256 of the tensors; :func:`load_component` rebuilds the component and
refuses a file whose content does not match its hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file next to ``path``; on success it replaces
    ``path`` atomically, on error it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write ``tensors`` as safetensors atomically, with their hash in the
    metadata (key ``sha256``). Returns the hash."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    digest = tensors_hash(tensors)
    meta = dict(metadata or {})
    meta["sha256"] = digest
    data = save(tensors, metadata=meta)
    with atomic_write(path) as fh:
        fh.write(data)
    return digest


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file written by :func:`save_tensors`, checking its
    hash. A missing, unreadable or corrupt file is a :class:`CheckpointError`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open is not iterable
    except Exception as exc:  # noqa: BLE001 - safetensors raises several kinds
        raise CheckpointError(f"corrupt checkpoint {path}: {exc}") from None
    expected = meta.get("sha256")
    if expected is None:
        raise CheckpointError(f"checkpoint {path} has no content hash (not written by tokenloom?)")
    actual = tensors_hash(tensors)
    if actual != expected:
        raise CheckpointError(f"corrupt checkpoint {path}: content hash {actual[:12]} does not match {expected[:12]}")
    return tensors, meta


def save_component(path: str | Path, component: torch.nn.Module, *, kind: str, name: str, options: dict[str, Any], extra: dict[str, Any] | None = None) -> str:
    """Save a component's ``state_dict`` with what is needed to rebuild it."""
    meta = {
        "tokenloom_kind": kind,
        "name": name,
        "options": json.dumps(options, sort_keys=True),
        "extra": json.dumps(extra or {}, sort_keys=True),
    }
    return save_tensors(path, dict(component.state_dict()), meta)


def load_component(path: str | Path, *, registry: Any = None, **context: Any) -> torch.nn.Module:
    """Rebuild a component saved by :func:`save_component` (``context``: e.g.
    ``image_shape=`` for a tokenizer) and load its state. ``registry``: where
    to find the component (default: the process-wide registry)."""
    from .registry import build_component, create

    tensors, meta = load_tensors(path)
    try:
        kind, name = meta["tokenloom_kind"], meta["name"]
        options = json.loads(meta["options"])
        extra = json.loads(meta.get("extra", "{}"))
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: missing or malformed metadata ({exc})") from None
    if kind == "tokenizer" and "image_shape" not in context and "image_shape" in extra:
        context["image_shape"] = tuple(extra["image_shape"])
    if registry is None:
        component = create(kind, name, **options, **context)
    else:
        component = build_component(registry, kind, name, {**options, **context}, path=kind)
    try:
        component.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit {kind} '{name}': {exc}") from None
    return component


def save_tokenizer(path: str | Path, tokenizer: Any, *, name: str, options: dict[str, Any]) -> str:
    return save_component(path, tokenizer, kind="tokenizer", name=name, options=options,
                          extra={"image_shape": list(tokenizer.image_shape)})
