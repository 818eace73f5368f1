"""The offline feature extractor ``tokenloom-cnn``: a small CNN classifier
(:class:`ExtractorNet`), the seeded recipe that trains it on the built-in data
sets (:class:`ExtractorRecipe`, :func:`train_extractor`), and its weights file
— safetensors with the content hash that eval cards record
(:func:`save_extractor`, :func:`load_extractor`, :func:`default_extractor_path`).

Nothing here knows torch-fidelity: :mod:`tokenloom.fidelity` wraps the net as a
torch-fidelity feature extractor and runs the metrics. Nothing downloads: the
default weights are trained once (well under a minute on a laptop CPU) and
cached under :func:`cache_dir`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from ..contract.errors import CheckpointError, InputError

#: The torch-fidelity name of the in-project extractor.
CNN_NAME = "tokenloom-cnn"


# ---------------------------------------------------------------------------
# Cache directory
# ---------------------------------------------------------------------------


def cache_dir(configured: str | None = None, ctx: Any = None) -> Path:
    """Where extractor weights and feature caches live: the metric's
    ``cache_dir`` option, else ``ctx.cache_dir`` (the run's), else
    ``$TOKENLOOM_CACHE_DIR``, else ``~/.cache/tokenloom``."""
    for candidate in (configured, getattr(ctx, "cache_dir", None), os.environ.get("TOKENLOOM_CACHE_DIR")):
        if candidate:
            return Path(candidate).expanduser()
    return Path.home() / ".cache" / "tokenloom"


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (memoised by path, size and mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


# ---------------------------------------------------------------------------
# The in-project feature extractor
# ---------------------------------------------------------------------------


class ExtractorNet(nn.Module):
    """A small CNN classifier on images resized to ``size``×``size``
    (bilinear, antialiased): a 3×3 conv stem (``width`` channels), then two
    blocks of two 3×3 convs (``2·width``, ``4·width`` channels), each conv
    followed by batch normalisation (running statistics at evaluation, so an
    image's features never depend on its batch) and ReLU, with 2× average
    pooling before each block; then global average pooling — the
    ``features``, ``4·width`` dims, non-negative like Inception's pool3 — and
    a linear classifier — the ``logits``. An optional auxiliary head
    (``n_aux`` binary attributes, e.g. the colours and count of a ``shapes``
    scene) only shapes the features during training."""

    def __init__(self, *, width: int, n_classes: int, size: int, n_aux: int = 0):
        super().__init__()
        self.width, self.n_classes, self.size, self.n_aux = int(width), int(n_classes), int(size), int(n_aux)
        w = self.width

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.body = nn.Sequential(
            *conv(3, w), nn.AvgPool2d(2),  # (B, w, s/2, s/2)
            *conv(w, 2 * w), *conv(2 * w, 2 * w), nn.AvgPool2d(2),  # (B, 2w, s/4, s/4)
            *conv(2 * w, 4 * w), *conv(4 * w, 4 * w),  # (B, 4w, s/4, s/4)
        )
        self.head = nn.Linear(4 * w, self.n_classes)
        self.aux = nn.Linear(4 * w, self.n_aux) if self.n_aux else None

    @property
    def feature_dim(self) -> int:
        return 4 * self.width

    def arch(self) -> dict[str, int]:
        return {"width": self.width, "n_classes": self.n_classes, "size": self.size, "n_aux": self.n_aux}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, 3, H, W]`` float in [-1, 1] -> features ``[B, 4w]``."""
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return self.body(x).mean(dim=(2, 3))  # (B, 4w)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: ``[B, 3, H, W]`` float in [-1, 1] -> (features ``[B, 4w]``, logits ``[B, K]``)."""
        f = self.features(x)
        return f, self.head(f)


def _as_rgb(images: torch.Tensor) -> torch.Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def train_extractor(
    images: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    *,
    aux: torch.Tensor | None = None,
    width: int = 16,
    size: int = 32,
    steps: int = 500,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    holdout: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: bool = False,
) -> tuple[ExtractorNet, dict[str, float]]:
    """Train an :class:`ExtractorNet` to classify ``images`` (``[N, C, H, W]``
    in [-1, 1], C = 1 or 3) into ``labels`` (``LongTensor[N]``), plus, when
    ``aux`` (``FloatTensor[N, A]`` of 0/1 targets, NaN where unknown) is
    given, to predict those binary attributes. All randomness
    (initialisation, batch order) comes from ``seed``, and training runs on
    one CPU thread (a fixed reduction order, and much faster than two
    threads on a busy machine), so a recipe gives the same weights on the
    same torch build and CPU. Returns the net (eval mode) and
    ``{"train_loss", "train_accuracy", "holdout_accuracy"}``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(images, labels, n_classes, aux=aux, width=width, size=size, steps=steps,
                      batch_size=batch_size, lr=lr, seed=seed, holdout=holdout, progress=progress)
    finally:
        torch.set_num_threads(threads)


def _train(images, labels, n_classes, *, aux, width, size, steps, batch_size, lr, seed, holdout, progress):
    from tqdm import tqdm

    if images.dim() != 4 or images.shape[1] not in (1, 3) or len(images) != len(labels) or len(images) == 0:
        raise InputError(f"train_extractor: expected images [N, 1|3, H, W] and N labels, got "
                         f"{tuple(images.shape)} and {tuple(labels.shape)}")
    if aux is not None and (aux.dim() != 2 or len(aux) != len(images)):
        raise InputError(f"train_extractor: aux must be [N, A], got {tuple(aux.shape)}")
    images = _as_rgb(images.float())
    labels = labels.long()
    g = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        net = ExtractorNet(width=width, n_classes=n_classes, size=size, n_aux=0 if aux is None else aux.shape[1])
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay to 0
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, i / max(1, steps)))))
    net.train()
    losses, accs = [], []
    for _ in tqdm(range(steps), desc=CNN_NAME, disable=not progress, leave=False):
        idx = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=g)
        f, logits = net(images[idx])
        loss = F.cross_entropy(logits, labels[idx])
        if aux is not None:
            target = aux[idx]
            known = ~torch.isnan(target)
            if known.any():
                loss = loss + F.binary_cross_entropy_with_logits(net.aux(f)[known], target[known])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        accs.append((logits.argmax(-1) == labels[idx]).float().mean().item())
    net.eval().requires_grad_(False)
    tail = max(1, len(losses) // 10)
    stats = {
        "train_loss": float(sum(losses[-tail:]) / tail) if losses else float("nan"),
        "train_accuracy": float(sum(accs[-tail:]) / tail) if accs else float("nan"),
    }
    if holdout is not None:
        stats["holdout_accuracy"] = classifier_accuracy(net, *holdout)
    return net, stats


@torch.no_grad()
def classifier_accuracy(net: ExtractorNet, images: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> float:
    """Fraction of ``images`` whose arg-max logit is their label."""
    images = _as_rgb(images.float())
    correct = 0
    for i in range(0, len(images), batch):
        _, logits = net(images[i : i + batch])
        correct += int((logits.argmax(-1) == labels[i : i + batch]).sum())
    return correct / max(1, len(images))


def save_extractor(path: str | Path, net: ExtractorNet, info: Mapping[str, Any] | None = None) -> str:
    """Write the net as safetensors (atomically, content hash in the metadata).
    Returns the content hash — the ``weights_sha256`` of the eval card."""
    from ..contract.checkpoint import save_tensors

    meta = {
        "tokenloom_extractor": CNN_NAME,
        "arch": json.dumps(net.arch(), sort_keys=True),
        "info": json.dumps(dict(info or {}), sort_keys=True, default=str),
    }
    return save_tensors(path, dict(net.state_dict()), meta)


def load_extractor(path: str | Path) -> tuple[ExtractorNet, dict[str, Any], str]:
    """Load a net written by :func:`save_extractor`; returns (net, info, content hash).
    A missing, corrupt or foreign file is a :class:`CheckpointError`."""
    from ..contract.checkpoint import load_tensors

    tensors, meta = load_tensors(path)
    if meta.get("tokenloom_extractor") != CNN_NAME:
        raise CheckpointError(f"{path}: not a {CNN_NAME} weights file (written by tokenloom.fidelity.save_extractor?)")
    try:
        arch = json.loads(meta["arch"])
        info = json.loads(meta.get("info", "{}"))
        net = ExtractorNet(**arch)
        net.load_state_dict(tensors, strict=True)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: malformed {CNN_NAME} weights file ({exc})") from None
    net.eval().requires_grad_(False)
    return net, info, meta["sha256"]


@attrs.frozen
class ExtractorRecipe:
    """How the default ``tokenloom-cnn`` is trained.

    Data: the ``train`` split of ``shapes`` at each of ``sizes`` (``n``
    scenes per size, a different data seed per size) and all of ``digits``
    (at 16 and 32 px), so that the features know small and large, coloured
    and grey images; every image is resized to ``size`` inside the net.
    Targets: one joint label space (the 3 shape classes, then the 10 digits)
    and, for ``shapes``, auxiliary binary attributes — which palette colours
    occur and how many shapes there are — so that the features also encode
    colour and count, not only the class. ``steps`` Adam steps of
    ``batch_size``. Reproducible from ``seed``: the same recipe on the same
    torch build gives the same weights hash."""

    sizes: tuple[int, ...] = (16, 32, 64)
    n: int = 2000
    n_holdout: int = 300
    size: int = 32
    steps: int = 500
    batch_size: int = 64
    width: int = 16
    lr: float = 3e-3
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({**self.as_dict(), "v": 2}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def as_dict(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "sizes": list(self.sizes)}


def _builtin_training_data(recipe: ExtractorRecipe) -> dict[str, Any]:
    from ..blocks.data import SHAPES_COLOURS, load_dataset
    from ..contract.config import DataConfig

    colours = list(SHAPES_COLOURS)
    n_aux = len(colours) + 3  # colour present (6), count 1/2/3 (3)

    def shapes_aux(attributes: list[dict]) -> torch.Tensor:
        out = torch.zeros(len(attributes), n_aux)
        for i, a in enumerate(attributes):
            for c in a["colours"]:
                out[i, colours.index(c)] = 1.0
            out[i, len(colours) + min(max(a["count"], 1), 3) - 1] = 1.0
        return out

    xs, ys, auxs = [], [], []
    for j, size in enumerate(recipe.sizes):
        cfg = DataConfig(name="shapes", size=size, n=recipe.n, n_holdout=0, channels=3)
        train = load_dataset(cfg, split="train", seed=recipe.seed * 1000 + j + 1)
        xs.append(train.images)
        ys.append(train.labels)
        auxs.append(shapes_aux(train.attributes))
    n_shapes = 3
    digits_cfg = {"n": 1797 - 500, "n_holdout": 500, "channels": 3}
    for size in (16, 32):
        train = load_dataset(DataConfig(name="digits", size=size, **digits_cfg), split="train", seed=recipe.seed)
        xs.append(train.images)
        ys.append(train.labels + n_shapes)
        auxs.append(torch.full((len(train.labels), n_aux), float("nan")))
    held_s = load_dataset(DataConfig(name="shapes", size=recipe.size, n=recipe.n, n_holdout=recipe.n_holdout,
                                     channels=3), split="holdout", seed=recipe.seed * 1000 + 999)
    held_d = load_dataset(DataConfig(name="digits", size=recipe.size, **digits_cfg), split="holdout",
                          seed=recipe.seed)
    return {
        "images": torch.cat([F.interpolate(x, size=(recipe.size, recipe.size), mode="bilinear",
                                           align_corners=False, antialias=True) if x.shape[-1] != recipe.size else x
                             for x in xs]).clamp(-1, 1),
        "labels": torch.cat(ys),
        "aux": torch.cat(auxs),
        "n_classes": n_shapes + 10,
        "holdout": (torch.cat([held_s.images, held_d.images]), torch.cat([held_s.labels, held_d.labels + n_shapes])),
        "classes": [*(f"shapes:{c}" for c in held_s.class_names), *(f"digits:{c}" for c in held_d.class_names)],
        "aux_names": [*(f"colour:{c}" for c in colours), "count:1", "count:2", "count:3"],
    }


def default_extractor_path(recipe: ExtractorRecipe | None = None, root: str | Path | None = None,
                           *, progress: bool = False) -> Path:
    """The cached ``tokenloom-cnn`` weights for ``recipe`` under
    ``<root>/extractors/``, training it first if absent (well under a minute
    on a laptop CPU). The file records the recipe, the class names of its
    logits and the held-out classification accuracy."""
    recipe = recipe or ExtractorRecipe()
    root = Path(root) if root is not None else cache_dir()
    path = root / "extractors" / f"{CNN_NAME}-{recipe.key()}.safetensors"
    if path.is_file():
        try:
            load_extractor(path)
            return path
        except CheckpointError as exc:  # corrupt cache entry: reported, moved aside, retrained (issue 14)
            import sys

            bad = path.with_name(path.name + ".corrupt")
            os.replace(path, bad)
            print(f"[tokenloom] warning: {exc} — moved aside to {bad.name}; training the extractor again",
                  file=sys.stderr, flush=True)
    data = _builtin_training_data(recipe)
    net, stats = train_extractor(
        data["images"], data["labels"], data["n_classes"], aux=data["aux"], width=recipe.width, size=recipe.size,
        steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr, seed=recipe.seed,
        holdout=data["holdout"], progress=progress,
    )
    save_extractor(path, net, {"recipe": recipe.as_dict(), "classes": data["classes"],
                               "aux": data["aux_names"], "n_train": len(data["labels"]), **stats})
    return path


__all__ = [
    "CNN_NAME",
    "ExtractorNet",
    "ExtractorRecipe",
    "cache_dir",
    "classifier_accuracy",
    "default_extractor_path",
    "file_sha256",
    "load_extractor",
    "save_extractor",
    "train_extractor",
]
