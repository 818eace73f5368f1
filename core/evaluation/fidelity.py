"""The torch-fidelity adapter: shared plumbing for the metrics computed by
torch-fidelity (``fid``, ``isc``, ``kid``, ``precision-recall``, and
``reconstruction``'s rFID).

The numbers themselves come from torch-fidelity's own functions (the steps of
``torch_fidelity.calculate_metrics``) — never re-implemented here. This
module decides *what* torch-fidelity sees and records *how*, so that two numbers are comparable exactly when their eval
cards match:

- **inputs**: images ``[N, C, H, W]`` float32 in [-1, 1] become uint8
  ``round((x + 1) · 127.5)`` tensors ``[N, 3, H, W]`` (torch-fidelity's input
  format); 1-channel images are replicated to 3 channels and the card says so;
- **feature extractors**, offline only (nothing downloads at run time):

  - ``tokenloom-cnn`` (default): a small CNN classifier trained once on the
    built-in data sets from a seeded :class:`ExtractorRecipe`, cached as a
    safetensors file (with its SHA-256) under the cache directory, and
    registered with ``torch_fidelity.register_feature_extractor``; features:
    ``features`` (global-average-pooled last conv block, ``4·width`` dims) and
    ``logits`` (its class logits, for IS);
  - ``inception-v3-compat`` (torch-fidelity's TF-compatible Inception, giving
    numbers comparable with papers) — only with a local weights file;
  - ``vgg16`` (torch-fidelity's, default for precision/recall in the
    literature) — only with a local weights file;

- **options**: every keyword handed to ``calculate_metrics`` is checked
  against ``torch_fidelity.defaults.DEFAULTS`` (it ignores unknown keys
  silently), and the user's pass-through ``options`` table too;
- **caches**: the reference set's features are cached by tokenloom (not by
  torch-fidelity, whose cache is read with a pickle load) as hash-checked
  safetensors files under ``<cache_dir>/fidelity``, keyed by the reference
  images' content hash, the extractor's weights hash and the layer; a corrupt
  file is reported, moved aside and recomputed. Nothing is ever unpickled;
- **computation**: the steps of ``torch_fidelity.calculate_metrics`` for one
  extractor, with torch-fidelity's own functions (feature extraction, IS,
  FID statistics and distance, KID, precision/recall), so the numbers are
  torch-fidelity's;
- **edge inputs** get a clear :class:`~tokenloom.errors.InputError` before
  torch-fidelity sees them (KID subset larger than the sample count, IS on an
  extractor without class logits, too few samples for the IS splits or the
  precision/recall neighbourhood); FID with fewer samples than the feature
  dimension + 1 is computed but warned about (the covariance is singular),
  with the number needed, and the warning is written into the card.

Heavy imports (torch_fidelity, torchvision) happen inside functions.

The in-project extractor itself (the net, its training recipe, its weights
file and hash) lives in :mod:`tokenloom.evaluation.extractor`, the Fréchet
distance formula in :mod:`tokenloom.evaluation.frechet`; their public names are
importable from here too, as they always were.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from ..contract.errors import ConfigError, InputError
from .extractor import (
    CNN_NAME,
    ExtractorNet,
    ExtractorRecipe,
    cache_dir,
    classifier_accuracy,
    default_extractor_path,
    file_sha256,
    load_extractor,
    save_extractor,
    train_extractor,
)
from .frechet import frechet_distance

#: Extractors tokenloom accepts; all but ``tokenloom-cnn`` need a local weights file.
EXTRACTORS: tuple[str, ...] = (CNN_NAME, "inception-v3-compat", "vgg16")
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
VGG16_HINT = "torchvision's vgg16 ImageNet state_dict (vgg16-397923af.pth), saved with torch.save"

#: torch-fidelity keywords tokenloom sets itself; a user ``options`` table may not override them.
RESERVED_OPTIONS: frozenset[str] = frozenset({
    "input1", "input2", "cuda", "isc", "fid", "kid", "prc", "ppl", "feature_extractor",
    "feature_extractor_weights_path", "cache_root", "cache", "input1_cache_name", "input2_cache_name",
    "datasets_root", "datasets_download", "verbose", "rng_seed", "batch_size", "save_cpu_ram",
    "isc_splits", "kid_subsets", "kid_subset_size", "prc_neighborhood", "feature_extractor_compile",
})
#: The options a user may pass through (and their metric).
PASS_THROUGH = {
    "feature_layer_isc": "isc", "feature_layer_fid": "fid", "feature_layer_kid": "kid",
    "feature_layer_prc": "prc", "feature_extractor_internal_dtype": None, "samples_shuffle": None,
    "kid_kernel": "kid", "kid_kernel_poly_degree": "kid", "kid_kernel_poly_gamma": "kid",
    "kid_kernel_poly_coef0": "kid", "kid_kernel_rbf_sigma": "kid", "prc_batch_size": "prc",
}

# feature dimension of each layer of torch-fidelity's own extractors
_KNOWN_DIMS = {
    "inception-v3-compat": {"64": 64, "192": 192, "768": 768, "2048": 2048, "logits_unbiased": 1008, "logits": 1008},
    "vgg16": {"fc2": 4096, "fc2_relu": 4096},
}
_LOGIT_LAYERS = {"inception-v3-compat": ("logits_unbiased", "logits"), "vgg16": (), CNN_NAME: ("logits",)}
_RESIZE = {
    "inception-v3-compat": "bilinear (TF1-compatible) to 299×299 inside inception-v3-compat",
    "vgg16": "bilinear (TF1-compatible) to 224×224 inside vgg16",
}
_METRIC_NAMES = {"fid": "FID", "isc": "Inception Score", "kid": "KID", "prc": "precision/recall"}


def _cnn_fidelity_class() -> type:
    """The torch-fidelity wrapper of :class:`ExtractorNet`, defined and
    registered (as ``tokenloom-cnn``) on first use."""
    global _CNN_CLASS
    if _CNN_CLASS is not None:
        return _CNN_CLASS
    import torch_fidelity
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    class TokenloomCNNExtractor(FeatureExtractorBase):
        """torch-fidelity adapter: uint8 ``[B, 3, H, W]`` -> (features, logits)."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            if feature_extractor_weights_path is None:
                raise InputError(f"{CNN_NAME}: no weights file given (tokenloom passes the cached one)")
            self.net, _, _ = load_extractor(feature_extractor_weights_path)

        @staticmethod
        def get_provided_features_list():
            return ("features", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

        def forward(self, x):
            if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
                raise InputError(f"{CNN_NAME}: expected uint8 [B, 3, H, W], got {getattr(x, 'dtype', type(x))} "
                                 f"{tuple(getattr(x, 'shape', ()))}")
            f, logits = self.net(x.float() / 127.5 - 1.0)
            out = {"features": f, "logits": logits}
            return tuple(out[k] for k in self.features_list)

    if CNN_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(CNN_NAME, TokenloomCNNExtractor)
    _CNN_CLASS = FEATURE_EXTRACTORS_REGISTRY[CNN_NAME]
    return _CNN_CLASS


_CNN_CLASS: type | None = None


# ---------------------------------------------------------------------------
# Options shared by the torch-fidelity metrics
# ---------------------------------------------------------------------------


def _check_options(_inst: Any, _attr: Any, value: Mapping[str, Any]) -> None:
    if not value:
        return
    from torch_fidelity.defaults import DEFAULTS

    problems = []
    for key, v in value.items():
        if key not in DEFAULTS:
            import difflib

            close = difflib.get_close_matches(key, list(DEFAULTS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"'{key}' is not a torch-fidelity option{hint} — torch-fidelity would ignore it silently")
        elif key in RESERVED_OPTIONS:
            problems.append(f"'{key}' is set by tokenloom (use the metric's own keys: extractor, weights, "
                            "batch_size, seed, splits, subsets, subset_size, neighborhood, cache)")
        elif key not in PASS_THROUGH:
            problems.append(f"'{key}' does not apply to tokenloom's in-memory inputs "
                            f"(options that apply: {', '.join(sorted(PASS_THROUGH))})")
        else:
            default = DEFAULTS[key]
            if default is not None and not isinstance(v, type(default)) and not (
                isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool)
            ):
                problems.append(f"'{key}' expects {type(default).__name__}, got {v!r}")
            if key == "kid_kernel" and v not in ("poly", "rbf"):
                problems.append(f"'kid_kernel' must be 'poly' or 'rbf', got {v!r}")
            if key == "feature_extractor_internal_dtype" and v not in ("float32", "float64"):
                problems.append(f"'feature_extractor_internal_dtype' must be 'float32' or 'float64', got {v!r}")
    if problems:
        raise ValueError("options: " + "; ".join(problems))


def _extractor_name(_inst: Any, _attr: Any, value: str) -> None:
    if value not in EXTRACTORS:
        raise ValueError(f"must be one of {', '.join(EXTRACTORS)}, got {value!r}")


def _positive_int(_inst: Any, attr: Any, value: Any) -> None:
    if value is not None and value < 1:
        raise ValueError(f"must be >= 1, got {value}")


def missing_weights_message(extractor: str, key: str = "weights", metric: str = "fid") -> str:
    if extractor == "inception-v3-compat":
        return (
            f"extractor 'inception-v3-compat' needs a local weights file, and tokenloom never downloads at run "
            f"time. Download it once on a machine with network access: {INCEPTION_URL} (or convert TensorFlow's "
            f"with torch-fidelity's util_convert_inception_weights), then set `[metrics.{metric}] {key} = "
            f"\"/path/to/weights-inception-2015-12-05-6726825d.pth\"`; or use extractor = \"{CNN_NAME}\" "
            "(the offline default)"
        )
    return (f"extractor '{extractor}' needs a local weights file ({VGG16_HINT}); set `[metrics.{metric}] {key} = "
            f"\"/path/to/file\"`, or use extractor = \"{CNN_NAME}\" (the offline default)")


@attrs.frozen
class FidelityOptions:
    """Keys shared by every torch-fidelity metric (a metric's ``Config``
    derives from this class):

    - ``extractor``: ``tokenloom-cnn`` (default, offline), or
      ``inception-v3-compat`` / ``vgg16`` with a local ``weights`` file;
    - ``weights``: path to the extractor weights (for ``tokenloom-cnn``: a
      file written by :func:`save_extractor`; absent = the cached default,
      trained on first use from ``recipe_steps`` / ``recipe_seed``);
    - ``batch_size``: images per extractor batch (does not change results);
    - ``seed``: torch-fidelity's ``rng_seed`` (IS shuffling, KID subsets);
    - ``cache`` / ``cache_dir``: reuse reference-set features (keyed by the
      images' content hash, the extractor and its weights hash);
    - ``options``: further torch-fidelity keywords (``kid_kernel``,
      ``feature_layer_fid``, ...), checked against its DEFAULTS.
    """

    extractor: str = attrs.field(default=CNN_NAME, validator=_extractor_name)
    weights: str | None = None
    batch_size: int = attrs.field(default=64, validator=_positive_int)
    seed: int = attrs.field(default=2020, validator=attrs.validators.ge(0))
    cache: bool = True
    cache_dir: str | None = None
    recipe_steps: int = attrs.field(default=500, validator=_positive_int)
    recipe_seed: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    options: dict[str, Any] = attrs.field(factory=dict, validator=_check_options)

    def __attrs_post_init__(self) -> None:
        if self.extractor != CNN_NAME and self.weights is None:
            raise ConfigError([f"weights: {missing_weights_message(self.extractor)}"])

    def recipe(self) -> ExtractorRecipe:
        return ExtractorRecipe(steps=self.recipe_steps, seed=self.recipe_seed)


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def to_uint8_rgb(images: Any, *, where: str) -> tuple[torch.Tensor, list[str]]:
    """``[N, C, H, W]`` float32 in [-1, 1] (C = 1 or 3) -> uint8 ``[N, 3, H, W]``
    = ``round((x + 1) · 127.5)``, plus notes for the card (channel replication)."""
    if not isinstance(images, torch.Tensor):
        raise InputError(f"{where}: expected a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise InputError(f"{where}: expected images [N, C, H, W], got shape {tuple(images.shape)}")
    if not images.dtype.is_floating_point:
        raise InputError(f"{where}: expected float images in [-1, 1], got {images.dtype}")
    if images.shape[1] not in (1, 3):
        raise InputError(f"{where}: expected 1 or 3 channels, got {images.shape[1]}")
    if images.numel() and not torch.isfinite(images).all():
        raise InputError(f"{where}: contains NaN or infinite values")
    if images.numel() and (images.min() < -1 - 1e-5 or images.max() > 1 + 1e-5):
        raise InputError(f"{where}: values must lie in [-1, 1], got [{images.min().item():.3g}, "
                         f"{images.max().item():.3g}]")
    notes = []
    x = images.detach().to("cpu", torch.float32)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
        notes.append(f"{where}: 1-channel images replicated to 3 channels")
    u8 = torch.round((x.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).contiguous()
    return u8, notes


def images_digest(u8: torch.Tensor) -> str:
    """SHA-256 of a uint8 image set (shape and bytes)."""
    h = hashlib.sha256(f"{tuple(u8.shape)}|".encode())
    h.update(u8.numpy().tobytes())
    return h.hexdigest()


class _UInt8Images(torch.utils.data.Dataset):
    def __init__(self, u8: torch.Tensor):
        self.u8 = u8

    def __len__(self) -> int:
        return len(self.u8)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.u8[i]


# ---------------------------------------------------------------------------
# Resolving an extractor
# ---------------------------------------------------------------------------


@attrs.frozen
class Extractor:
    """A resolved extractor: its torch-fidelity name, weights file and hash,
    feature dimension per layer, logit layers, and what it does to inputs."""

    name: str
    weights_path: str
    weights_sha256: str
    dims: dict[str, int]
    logit_layers: tuple[str, ...]
    resize: str
    info: dict[str, Any] = attrs.Factory(dict)

    def default_layer(self, metric: str) -> str:
        if self.name == CNN_NAME:
            return _cnn_fidelity_class().get_default_feature_layer_for_metric(metric)
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

        return FEATURE_EXTRACTORS_REGISTRY[self.name].get_default_feature_layer_for_metric(metric)


def resolve_extractor(opts: FidelityOptions, ctx: Any = None, *, metric: str = "fid",
                      progress: bool = False) -> Extractor:
    """Find (or train, for the default ``tokenloom-cnn``) the weights file and
    describe the extractor. Raises a clear error instead of downloading."""
    root = cache_dir(opts.cache_dir, ctx)
    if opts.extractor == CNN_NAME:
        path = Path(opts.weights).expanduser() if opts.weights else default_extractor_path(
            opts.recipe(), root, progress=progress)
        if not path.is_file():
            raise ConfigError([f"metrics.{metric}.weights: no such file: {path}"])
        net, info, digest = load_extractor(path)
        _cnn_fidelity_class()
        return Extractor(
            CNN_NAME, str(path), digest, {"features": net.feature_dim, "logits": net.n_classes}, ("logits",),
            f"bilinear (antialiased) to {net.size}×{net.size} inside {CNN_NAME}",
            {k: info[k] for k in ("recipe", "holdout_accuracy", "n_train") if k in info},
        )
    if opts.weights is None:  # caught by the config already; kept for direct use
        raise ConfigError([f"metrics.{metric}.weights: {missing_weights_message(opts.extractor, metric=metric)}"])
    path = Path(opts.weights).expanduser()
    if not path.is_file():
        raise ConfigError([f"metrics.{metric}.weights: no such file: {path} — "
                           + missing_weights_message(opts.extractor, metric=metric)])
    return Extractor(opts.extractor, str(path), file_sha256(path), dict(_KNOWN_DIMS[opts.extractor]),
                     _LOGIT_LAYERS[opts.extractor], _RESIZE[opts.extractor])


# ---------------------------------------------------------------------------
# Running torch-fidelity
# ---------------------------------------------------------------------------


def backend_version() -> str:
    import torch_fidelity

    return f"torch-fidelity {torch_fidelity.__version__}"


def _checked_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    from torch_fidelity.defaults import DEFAULTS

    unknown = sorted(set(kwargs) - set(DEFAULTS))
    if unknown:  # a programming error in tokenloom, not a user error
        raise AssertionError(f"not torch-fidelity options (they would be ignored silently): {unknown}")
    return kwargs


def _protocol_warn(card: dict[str, Any], message: str) -> None:
    card.setdefault("warnings", []).append(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def run_fidelity(
    which: Mapping[str, Mapping[str, Any]],
    generated: torch.Tensor,
    reference: torch.Tensor | None,
    opts: FidelityOptions,
    ctx: Any = None,
    *,
    metric: str,
    reference_name: str = "real",
    reference_stats: str | None = None,
    progress: bool = False,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Compute torch-fidelity metrics ``which`` (keys among ``isc``, ``fid``,
    ``kid``, ``prc``, each with its own keywords such as ``isc_splits``) of
    ``generated`` (torch-fidelity's input1) against ``reference`` (input2),
    or against the ``mu``/``sigma`` in the ``.npz`` ``reference_stats`` (FID
    only). Returns torch-fidelity's result dict and the eval card."""
    which = {k: dict(v) for k, v in which.items()}
    if not which or set(which) - set(_METRIC_NAMES):
        raise ValueError(f"run_fidelity: unknown metrics {sorted(which)}")
    ext = resolve_extractor(opts, ctx, metric=metric, progress=progress)
    gen_u8, notes = to_uint8_rgb(generated, where=f"{metric}: generated images")
    card: dict[str, Any] = {
        "metric": metric,
        "backend": backend_version(),
        "extractor": ext.name,
        "weights_sha256": ext.weights_sha256,
        "feature_layers": {},
        "input": "float [-1, 1] -> uint8 round((x + 1) * 127.5)",
        "resize": ext.resize,
        "crop": "none",
        "n_generated": len(gen_u8),
        "seed": opts.seed,
        "options": dict(sorted(opts.options.items())),
    }
    if ext.info:
        card["extractor_info"] = ext.info
    binary = any(k in which for k in ("fid", "kid", "prc"))
    ref_u8 = None
    if binary and reference_stats is None:
        if reference is None:
            raise InputError(f"{metric}: needs reference images (ctx.real) or reference statistics")
        ref_u8, ref_notes = to_uint8_rgb(reference, where=f"{metric}: reference images")
        notes += ref_notes
        card["reference"] = {"set": reference_name, "n": len(ref_u8), "sha256": images_digest(ref_u8)}
    if notes:
        card["input_notes"] = notes

    layers: dict[str, str] = {}
    for m in which:
        layer = opts.options.get(f"feature_layer_{m}") or ext.default_layer(m)
        if layer not in ext.dims:
            raise ConfigError([(f"metrics.{metric}.options.feature_layer_{m}: extractor '{ext.name}' has no layer "
                                f"{layer!r} (layers: {', '.join(ext.dims)})")])
        layers[m] = layer
    card["feature_layers"] = layers

    n_gen = len(gen_u8)
    n_ref = len(ref_u8) if ref_u8 is not None else None
    if "isc" in which:
        if layers["isc"] not in ext.logit_layers:
            have = ", ".join(ext.logit_layers) or "none"
            raise InputError(
                f"{metric}: the Inception Score needs class logits, but layer {layers['isc']!r} of extractor "
                f"'{ext.name}' is not a logits layer (its logits layers: {have}); use extractor = \"{CNN_NAME}\" "
                "or \"inception-v3-compat\" (with weights)"
            )
        splits = which["isc"]["isc_splits"]
        if n_gen < splits:
            raise InputError(f"{metric}: {n_gen} generated images cannot make {splits} IS splits; generate at "
                             f"least {splits} images or set splits <= {n_gen}")
        card["isc_splits"] = splits
    if "kid" in which:
        size = which["kid"]["kid_subset_size"]
        if size is None:
            size = min(1000, n_gen, n_ref if n_ref is not None else n_gen)
            which["kid"]["kid_subset_size"] = size
        smallest = min(n_gen, n_ref)
        if size > smallest:
            raise InputError(
                f"{metric}: KID subset size {size} is larger than the number of samples (generated: {n_gen}, "
                f"reference: {n_ref}); set `[metrics.{metric}] subset_size` to at most {smallest} or use more samples"
            )
        if size < 2:
            raise InputError(f"{metric}: KID needs subsets of at least 2 samples, got {size}")
        card["kid_subsets"] = which["kid"]["kid_subsets"]
        card["kid_subset_size"] = size
    if "prc" in which:
        k = which["prc"]["prc_neighborhood"]
        if min(n_gen, n_ref) <= k:
            raise InputError(f"{metric}: precision/recall with neighbourhood k = {k} needs more than {k} samples "
                             f"in each set (generated: {n_gen}, reference: {n_ref})")
        card["prc_neighborhood"] = k
    if "fid" in which:
        dim = ext.dims[layers["fid"]]
        for label, n in (("generated", n_gen), ("reference", n_ref)):
            if n is not None and n < 2:
                raise InputError(f"{metric}: FID needs at least 2 {label} images, got {n}")
            if n is not None and n < dim + 1:
                _protocol_warn(card, f"{metric}: {n} {label} images are fewer than the feature dimension + 1 "
                                     f"({dim + 1}) of layer {layers['fid']!r}: the covariance is singular and FID is "
                                     f"unreliable; use at least {dim + 1} images")

    root = cache_dir(opts.cache_dir, ctx) / "fidelity"
    kwargs: dict[str, Any] = {
        "cuda": str(getattr(ctx, "device", "cpu") or "cpu").startswith("cuda"),
        "batch_size": opts.batch_size,
        "feature_extractor": ext.name,
        "feature_extractor_weights_path": ext.weights_path,
        "cache": False,  # tokenloom keeps its own feature cache; torch-fidelity's is a pickle
        "rng_seed": opts.seed,
        "save_cpu_ram": True,  # no DataLoader worker processes for in-memory tensors
        "verbose": False,
        "datasets_download": False,
        **{m: True for m in which},
        **{k: v for extra in which.values() for k, v in extra.items()},
        **opts.options,
    }
    tag = f"{ext.name}-w{ext.weights_sha256[:12]}"
    ref_stats = None
    if reference_stats is not None:
        if set(which) != {"fid"}:
            raise ConfigError([f"metrics.{metric}.reference_stats: precomputed statistics serve FID only"])
        ref_stats, card["reference"] = _read_reference_stats(reference_stats, ext, layers["fid"])
    card["cache_key"] = tag
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            result = _calculate(_checked_kwargs(kwargs), which, layers, gen_u8, ref_u8, ref_stats,
                                cache=_FeatureCache(root, card, tag) if opts.cache and ref_u8 is not None else None)
    except ValueError as exc:  # torch-fidelity's vassert
        raise InputError(f"{metric}: torch-fidelity rejected the inputs: {exc}") from None
    return {k: float(v) for k, v in result.items()}, card


class _FeatureCache:
    """tokenloom's cache of the reference set's features, one safetensors file
    per feature layer under ``<cache_dir>/fidelity``, named by the extractor
    (with its weights hash) and keyed by the reference images' content hash,
    the layer and the extractor's internal dtype. Files are hash-checked when
    read (:func:`~tokenloom.checkpoint.load_tensors`); a corrupt or mismatching
    file is reported on stderr, moved aside to ``<name>.corrupt`` and
    recomputed. Nothing here is ever unpickled (torch-fidelity's own cache,
    which is read with a pickle load, is never used)."""

    def __init__(self, root: Path, card: dict[str, Any], tag: str):
        self.root, self.tag = root, tag
        self.ref_sha, self.n = card["reference"]["sha256"], card["reference"]["n"]

    def key(self, layer: str, dtype: Any) -> str:
        text = json.dumps({"reference": self.ref_sha, "extractor": self.tag, "layer": layer, "dtype": dtype},
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def path(self, layer: str, dtype: Any) -> Path:
        return self.root / f"features-{self.tag}-{self.key(layer, dtype)}.safetensors"

    def load(self, layers: list[str], dtype: Any) -> dict[str, torch.Tensor] | None:
        """The cached features of every layer in ``layers``, or None when any is missing or corrupt."""
        from ..contract.checkpoint import load_tensors
        from ..contract.errors import CheckpointError

        out = {}
        for layer in layers:
            path = self.path(layer, dtype)
            if not path.is_file():
                return None
            try:
                tensors, meta = load_tensors(path)
                feats = tensors.get("features")
                if meta.get("key") != self.key(layer, dtype) or feats is None or feats.dim() != 2 \
                        or feats.shape[0] != self.n:
                    raise CheckpointError(f"corrupt fidelity feature cache {path}: its key or shape does not "
                                          "match the reference set")
            except CheckpointError as exc:
                bad = path.with_name(path.name + ".corrupt")
                print(f"[tokenloom] warning: {exc} — moved aside to {bad.name}; recomputing", file=sys.stderr,
                      flush=True)
                os.replace(path, bad)
                return None
            out[layer] = feats
        return out

    def save(self, featuresdict: Mapping[str, torch.Tensor], dtype: Any) -> None:
        from ..contract.checkpoint import save_tensors

        for layer, feats in featuresdict.items():
            save_tensors(self.path(layer, dtype), {"features": feats},
                         {"key": self.key(layer, dtype), "tokenloom_kind": "fidelity-features", "layer": layer})


def _calculate(kwargs: dict[str, Any], which: Mapping[str, Any], layers: Mapping[str, str], gen_u8: torch.Tensor,
               ref_u8: torch.Tensor | None, ref_stats: dict[str, Any] | None,
               cache: _FeatureCache | None) -> dict[str, Any]:
    """What ``torch_fidelity.calculate_metrics`` computes for one extractor,
    with the same torch-fidelity functions in the same way (so the numbers are
    the same), except that the reference features come from tokenloom's
    :class:`_FeatureCache` instead of torch-fidelity's pickle cache."""
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.metric_kid import kid_featuresdict_to_metric
    from torch_fidelity.metric_prc import prc_featuresdict_to_metric
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    needed = sorted(set(layers.values()))
    fe = create_feature_extractor(kwargs["feature_extractor"], needed, **kwargs)

    def features(u8: torch.Tensor) -> dict[str, torch.Tensor]:
        return get_featuresdict_from_dataset(_UInt8Images(u8), fe, kwargs["batch_size"], kwargs["cuda"],
                                             kwargs["save_cpu_ram"], kwargs["verbose"])

    fd1 = features(gen_u8)
    fd2 = None
    if ref_u8 is not None:
        dtype = kwargs.get("feature_extractor_internal_dtype")
        fd2 = cache.load(needed, dtype) if cache is not None else None
        if fd2 is None:
            fd2 = features(ref_u8)
            if cache is not None:
                cache.save(fd2, dtype)
    metrics: dict[str, Any] = {}
    if "isc" in which:
        metrics.update(isc_featuresdict_to_metric(fd1, layers["isc"], **kwargs))
    if "fid" in which:
        stats2 = ref_stats if ref_stats is not None else fid_featuresdict_to_statistics(fd2, layers["fid"])
        metrics.update(fid_statistics_to_metric(fid_featuresdict_to_statistics(fd1, layers["fid"]), stats2,
                                                kwargs["verbose"]))
    if "kid" in which:
        metrics.update(kid_featuresdict_to_metric(fd1, fd2, layers["kid"], **kwargs))
    if "prc" in which:
        metrics.update(prc_featuresdict_to_metric(fd1, fd2, layers["prc"], **kwargs))
    return metrics


def _read_reference_stats(path_str: str, ext: Extractor, layer: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``mu``/``sigma`` from an ``.npz`` (read without pickle), checked against
    the extractor's layer, as torch-fidelity's FID statistics (float32 mu,
    float64 sigma)."""
    import numpy as np

    path = Path(path_str).expanduser()
    if not path.is_file():
        raise ConfigError([f"reference_stats: no such file: {path}"])
    try:
        with np.load(path, allow_pickle=False) as npz:
            mu, sigma = np.asarray(npz["mu"]), np.asarray(npz["sigma"])
    except KeyError as exc:
        raise InputError(f"reference_stats {path}: missing array {exc} (expected 'mu' and 'sigma')") from None
    except Exception as exc:  # noqa: BLE001 - numpy raises several kinds
        why = ("it holds pickled Python objects, which tokenloom never loads; store plain float arrays 'mu' and "
               "'sigma'" if "pickle" in str(exc) else str(exc))
        raise InputError(f"reference_stats {path}: unreadable .npz ({why})") from None
    dim = ext.dims[layer]
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise InputError(f"reference_stats {path}: mu {mu.shape} / sigma {sigma.shape} do not match layer "
                         f"{layer!r} of '{ext.name}' ({dim} dims) — statistics must come from the same extractor")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise InputError(f"reference_stats {path}: contains NaN or infinite values")
    # torch-fidelity's own statistics have float32 mu and float64 sigma
    stats = {"mu": mu.astype(np.float32), "sigma": sigma.astype(np.float64)}
    return stats, {"stats": str(path), "sha256": file_sha256(path)}


def protocol_card(metric: str, opts: FidelityOptions, **extra: Any) -> dict[str, Any]:
    """The protocol a torch-fidelity metric will follow, as known from its
    configuration alone (before :meth:`compute` fills in the extractor's
    weights hash, the reference set and the sample counts)."""
    card = {
        "metric": metric,
        "backend": "torch-fidelity",
        "extractor": opts.extractor,
        "weights": opts.weights if opts.weights else f"cached default (recipe {opts.recipe().as_dict()})",
        "input": "float [-1, 1] -> uint8 round((x + 1) * 127.5)",
        "crop": "none",
        "seed": opts.seed,
        "options": dict(sorted(opts.options.items())),
        **extra,
        "computed": False,
    }
    return card


@torch.no_grad()
def extract_features(images: torch.Tensor, opts: FidelityOptions, ctx: Any = None, *, layer: str | None = None,
                     metric: str = "fid") -> torch.Tensor:
    """Features of ``images`` exactly as torch-fidelity's extractor computes
    them (same uint8 conversion, same module) — for tests and analyses."""
    from torch_fidelity.utils import create_feature_extractor

    ext = resolve_extractor(opts, ctx, metric=metric)
    layer = layer or ext.default_layer("fid")
    fe = create_feature_extractor(ext.name, [layer], cuda=False, feature_extractor_weights_path=ext.weights_path,
                                  verbose=False)
    u8, _ = to_uint8_rgb(images, where="images")
    out = [fe(u8[i : i + opts.batch_size])[0] for i in range(0, len(u8), opts.batch_size)]
    return torch.cat(out)


def finite_or_none(value: Any) -> float | None:
    """``float(value)`` when it is a finite number, else None."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


__all__ = [
    "CNN_NAME",
    "EXTRACTORS",
    "INCEPTION_URL",
    "Extractor",
    "ExtractorNet",
    "ExtractorRecipe",
    "FidelityOptions",
    "backend_version",
    "cache_dir",
    "classifier_accuracy",
    "default_extractor_path",
    "extract_features",
    "file_sha256",
    "finite_or_none",
    "frechet_distance",
    "images_digest",
    "load_extractor",
    "missing_weights_message",
    "protocol_card",
    "resolve_extractor",
    "run_fidelity",
    "save_extractor",
    "to_uint8_rgb",
    "train_extractor",
]
