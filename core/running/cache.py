"""The stage cache of a run: one content hash, the key of every stage, and the check of a cached file.

Every artifact of a run is cached under ``<out>/cache/`` by a hash of exactly what it depends on
(the table in :mod:`tokenloom.pipeline`). :func:`stable_hash` is the one hash of the project: cache
keys, run ids and the ids of grid cells are all short SHA-256 digests of canonical JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import attrs

from ..backbone import dist
from ..contract.checkpoint import load_tensors, tensors_hash
from ..contract.config import RunConfig
from ..contract.errors import CheckpointError
from .pipeline_check import image_shape_of


def stable_hash(obj: Any, n: int = 16) -> str:
    """The first ``n`` hex digits of the SHA-256 of the canonical JSON of ``obj`` (keys sorted,
    no spaces, anything JSON cannot write as its ``str``)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def component_key(c: Any) -> dict:
    """A component's identity for cache keys: its name and *full* structured
    config (defaults included, so a plugin changing a default invalidates
    the cache) — the raw table when the config is not an attrs instance.
    Options a plugin added later and lists in its ``Config.later_defaults``
    (``{name: default}``, a plain class attribute) are left out while they
    have that default, so existing runs keep their keys (as
    ``ModelConfig.key`` does for ``[model]``)."""
    cfg = c.config
    if cfg is not None and attrs.has(type(cfg)):
        d = attrs.asdict(cfg)
        for name, default in getattr(type(cfg), "later_defaults", {}).items():
            if name in d and d[name] == default:
                del d[name]
        return {"name": c.name, "config": d}
    return c.table()


def data_key(cfg: RunConfig) -> str:
    """The ``data_id`` of caches when the run loads ``cfg.data`` itself."""
    from ..contract.config import STREAM_OPTIONS

    data = attrs.asdict(cfg.data)
    if not data.get("holdout_combos"):  # absent unless used: the keys of every other config as before
        data.pop("holdout_combos", None)
    defaults = attrs.asdict(type(cfg.data)())
    for k in STREAM_OPTIONS:  # streamed sets' options: in the key only when set; workers never (same images)
        if k == "workers" or data.get(k) == defaults[k]:
            data.pop(k, None)
    return stable_hash(data)


def data_content_key(train: Any, holdout: Any) -> str:
    """The ``data_id`` of caches when the image sets are handed in: a hash of their content (of a
    streamed set: of what identifies its files, :func:`tokenloom.blocks.streaming.dataset_identity`)."""
    from ..blocks.streaming import dataset_identity, is_lazy

    if is_lazy(train.images) or is_lazy(holdout.images):
        return stable_hash({"train": dataset_identity(train), "holdout": dataset_identity(holdout),
                            "train_labels": tensors_hash({"l": train.labels}),
                            "holdout_labels": tensors_hash({"l": holdout.labels})})
    return tensors_hash({"train": train.images, "train_labels": train.labels,
                         "holdout": holdout.images, "holdout_labels": holdout.labels})[:16]


def threads_key() -> dict:
    """The part of a training stage's key that is the machine's: torch's CPU
    thread count. Fitting and training are not bit-identical across thread
    counts (floating-point reductions are split differently), so a tokenizer
    or model trained under another thread count is not reused silently: it
    is trained again (and the run record says which count was used)."""
    import torch

    return {"cpu_threads": torch.get_num_threads()}


def tokenizer_key(cfg: RunConfig, data_id: str) -> str:
    """The tokenizer's cache key (``cache/tokenizer-<key>.safetensors``):
    known before fitting, so an ablation can plan which tokenizers it fits;
    includes :func:`threads_key`."""
    return stable_hash({"tokenizer": component_key(cfg.tokenizer), "data": data_id, "seed": cfg.seed,
                        "image_shape": image_shape_of(cfg), **threads_key()})


def tokenizer_hash(key: str, weights_sha256: str) -> str:
    """The identity of a fitted tokenizer: its config key and its weights."""
    return stable_hash({"key": key, "weights": weights_sha256})


def codes_key(tok_hash: str, data: Any) -> str:
    """The key of the encoded splits (``cache/codes-<key>.safetensors``): the tokenizer's identity
    and ``data``, what identifies the images (a run's: ``{"data": data_id, "seed": seed}``)."""
    return stable_hash({"tokenizer": tok_hash, "data": data})


def head_keys(cfg: RunConfig) -> tuple[dict, dict]:
    """The ``[head]``'s part of the model key and of the samples key. Empty for no head or the
    ``categorical`` one (the keys of discrete runs as before heads existed). Options the head's
    config lists in ``Config.sampling_options`` (a plain class attribute, a tuple of option names,
    e.g. a diffusion head's sampling steps) change only how tokens are drawn, not training: they
    are left out of the model key and go into the samples key, so sweeping them reuses the model."""
    head = getattr(cfg, "head", None)
    if head is None or head.name == "categorical":
        return {}, {}
    key = component_key(head)
    names = getattr(type(head.config), "sampling_options", ()) if head.config is not None else ()
    options = key.get("config")
    if not names or not isinstance(options, dict):
        return {"head": key}, {}
    options = dict(options)
    sampling = {n: options.pop(n) for n in names if n in options}
    return {"head": {**key, "config": options}}, {"head_sampling": sampling}


def model_key(cfg: RunConfig, spec: Any, tok_hash: str, n_classes: int, data_id: str) -> str:
    """The key of a trained backbone: tokenizer × ``model_spec()`` × ``[model]`` × ``[train]`` × seed
    × :func:`threads_key` × the ``[head]`` (only when it is not ``categorical``: the keys of discrete
    runs as before heads existed; its sampling-only options left out, :func:`head_keys`)."""
    extra = head_keys(cfg)[0]
    return stable_hash({"tokenizer": tok_hash, "spec": spec.key(), "model": cfg.model.key(),
                        "train": attrs.asdict(cfg.train), "n_classes": n_classes, "data": data_id, "seed": cfg.seed,
                        **threads_key(), **extra})


def samples_key(cfg: RunConfig, model: str, *, n: int, region: str | None, micro_batch: int) -> str:
    """The key of the generated codes: model × generator × sampler chain × n × region × micro-batch
    (× the head's sampling-only options, when it has any: :func:`head_keys`)."""
    return stable_hash({"model": model, "generator": component_key(cfg.generator),
                        "sampler": [component_key(s) for s in cfg.sampler],
                        "n": n, "region": region, "seed": cfg.seed, "micro_batch": micro_batch,
                        **head_keys(cfg)[1]})


def cache_ok(path: Path) -> bool:
    """Whether the cached artifact ``path`` exists and its content hash
    checks. A corrupt file (unreadable, hash mismatch) is reported on stderr
    and moved aside to ``<name>.corrupt``, so its stage recomputes it."""
    if not path.is_file():
        return False
    try:
        load_tensors(path)
        return True
    except CheckpointError as exc:
        bad = path.with_name(path.name + ".corrupt")
        print(f"[tokenloom] warning: {exc} — moved aside to {bad.name}; recomputing", file=sys.stderr, flush=True)
        os.replace(path, bad)
        return False


def cached(path: Path) -> bool:
    """:func:`cache_ok` decided by rank 0 and agreed by every rank."""
    return bool(dist.agree(cache_ok(path) if dist.is_main() else None))


__all__ = [
    "cache_ok",
    "cached",
    "codes_key",
    "component_key",
    "data_content_key",
    "data_key",
    "head_keys",
    "model_key",
    "samples_key",
    "stable_hash",
    "threads_key",
    "tokenizer_hash",
    "tokenizer_key",
]
