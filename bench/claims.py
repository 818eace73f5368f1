"""The seeds' headline claims, checked at this project's scale: runs a
compute-matched study through ``tokenloom ablate`` and writes
``docs/claims.md`` with one row per claim and a verdict computed here.

    .venv/bin/python bench/claims.py [--budget smoke|small|full] [--out runs/claims-<budget>]
        [--docs docs] [--recipe bench/claims-recipe.toml] [--estimate] [--write-grids DIR]

(``make claims`` runs the full budget; ``--estimate`` times a few steps of
every stage and prints how long the budget would take here; the full
budget's grid files are also in ``examples/claims/``, written by
``--write-grids``.) What it runs, every study into one
output directory with one shared ``<out>/cache`` (each tokenizer fitted and
each backbone trained once; a re-run reuses every finished stage and cell):

1. **orders at equal training FLOPs** — one grid per trained order
   (``<out>/grids/orders-<order>.toml``): the order and the decoders that
   share its model (``zipar`` on raster's, ``random-parallel`` on random's,
   RAR beside raster) × ``train.steps`` at each budget × seeds. A budget is
   a number of ``raster`` steps; every other order gets the steps that spend
   the same training FLOPs at its own sequence length and parameter count
   (the trainer's count, as in ``examples/orders_compare.py``). Lower budgets
   run the first seed, the top budget every seed. This gives
   ``plots/quality-vs-train-flops.png`` (``shapes_valid`` and FID against
   ``train_flops``, one line per order);
2. **decoders of the raster model** at the top budget: ``sjd`` and
   ``speculative`` with exact acceptance, ``lantern`` and ``gsd``;
3. **guidance sweep** (``sampler.cfg.scale``) of raster at the top budget;
4. **MaskGIT steps sweep** (``generator.steps``) on one masked model;
5. **codebook use**: ``vq`` with and without dead-code restarts, ``fsq``,
   ``lfq`` at the same vocabulary (the ``codebook`` metric on held-out codes);
6. **zero-shot inpainting**: the ``random`` (RandAR) model regenerating the
   centre of held-out images (``tokenloom.pipeline.run(..., region="center")``:
   regions are a run option, not a grid axis), judged by the oracle.

Every claim is then a small function of the measured figures and a verdict
from the statistics below — pure functions on plain numbers (no torch, no
files), exercised by ``tests/test_claims.py`` on synthetic figures.

Budgets: ``smoke`` (minutes: tiny tokenizers and backbones, 16 samples; it
exercises every claim's code path and its verdicts are mostly inconclusive
by design), ``small`` and ``full`` (the study). The recipe (data, tokenizer,
backbone, sampler chain) is ``bench/claims-recipe.toml`` when it exists
and the budget is not ``smoke``, else the built-in one: 16-px shapes, ``vq``
with downsample 2 and 512 codes (8 × 8 codes), a 4 × 128 backbone.
``bench/claims-recipe.toml`` is the conv-encoder VQ / top-k 4 recipe the
published study was measured with; the demo's recipe has since moved on
(``examples/shapes-recipe.toml``: a patchwise VQ and top-p 0.95, which
``apply_recipe`` would not carry over — it reads only top-k and cfg — and
says so in the recipe line of docs/claims.md: ``not_carried_over``).

Estimates. A figure measured on ``k`` seeds is an :class:`Estimate`: its
mean, a standard error and the quantile that turns the standard error into a
95 % interval.

- A **proportion** (``shapes_valid``, an acceptance rate) over ``n`` samples
  per seed: the Agresti–Caffo standard error of the pooled count (one
  success and one failure added, so 0/n and n/n still have a width), or the
  seeds' own spread ``sd / √k`` when that is larger; quantile 1.96.
- A **mean** of another figure (FID, codebook utilisation, NFE): the seeds'
  ``sd / √k`` with Student's t quantile for ``k − 1`` degrees of freedom
  (12.71 for two seeds: two seeds say little, and the interval shows it); one
  seed has no interval unless the figure is exact (``exact=True``: NFE of a
  fixed schedule).

Differences and ratios of independent estimates add their standard errors
in quadrature (the ratio by the delta method) and keep the larger quantile.

Verdicts (``margin`` in the figure's own units):

- :func:`verdict_at_least` ``a ≥ b − margin`` ("matches", "near", "loses
  little"): holds when the interval of ``a − b`` lies above ``−margin``,
  does not hold when it lies below, inconclusive when it straddles — or when
  the reference ``b`` is below a ``floor`` (two orders that both fail every
  image "match" vacuously);
- :func:`verdict_greater` ``a > b`` ("improves"): holds when the interval of
  ``a − b`` lies above 0, does not hold when it lies at or below 0;
- :func:`verdict_threshold` ``x ≥ t`` (a speed-up of at least 2×);
- :func:`verdict_u_shape`: some inside point beats both ends (rises, then
  falls); does not hold when an end beats every inside point;
- :func:`verdict_saturates`: the best later point beats the first, and the
  last step adds no more than ``margin``;
- :func:`combine`: all parts hold → holds; any part does not → does not hold.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

HOLDS = "holds"
FAILS = "does not hold"
UNSURE = "inconclusive"
VERDICTS = (HOLDS, FAILS, UNSURE)

Z95 = 1.959964
# two-sided 97.5 % quantiles of Student's t for 1..10 degrees of freedom
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t_quantile(dof: int) -> float:
    """The 0.975 quantile of Student's t with ``dof`` degrees of freedom (1.96 beyond 30)."""
    if dof < 1:
        raise ValueError(f"t_quantile: dof must be at least 1, got {dof}")
    if dof <= len(_T975):
        return _T975[dof - 1]
    return Z95 if dof > 30 else 2.042 + (2.228 - 2.042) * (30 - dof) / 20


@dataclass(frozen=True)
class Estimate:
    """A figure with a 95 % interval: ``mean ± q · se``; ``values`` the per-seed figures."""

    mean: float
    se: float
    q: float
    values: tuple[float, ...] = ()
    bounds: tuple[float, float] | None = None  # the figure's range (a proportion: 0..1); the interval is clipped

    @property
    def lo(self) -> float:
        lo = self.mean - self.q * self.se
        return max(lo, self.bounds[0]) if self.bounds else lo

    @property
    def hi(self) -> float:
        hi = self.mean + self.q * self.se
        return min(hi, self.bounds[1]) if self.bounds else hi

    @property
    def sd(self) -> float | None:
        k = len(self.values)
        if k < 2:
            return None
        m = math.fsum(self.values) / k
        return math.sqrt(math.fsum((v - m) ** 2 for v in self.values) / (k - 1))

    def text(self, digits: int = 2) -> str:
        """``0.81 ± 0.03 [0.72, 0.90] (2 seeds)``: mean ± seed sd, the interval, seeds."""
        f = f"{{:.{digits}f}}"
        sd = self.sd
        out = f.format(self.mean) + ("" if sd is None else " ± " + f.format(sd))
        if math.isfinite(self.se) and self.se > 0:
            out += f" [{f.format(self.lo)}, {f.format(self.hi)}]"
        elif not math.isfinite(self.se):
            out += " [no interval]"
        k = len(self.values)
        if k:
            out += f" ({k} seed{'s' if k > 1 else ''})"
        return out


def _clean(values: Sequence[float | None]) -> list[float]:
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        raise ValueError("no values to estimate from")
    return xs


def _seed_se(xs: list[float]) -> float:
    k = len(xs)
    if k < 2:
        return 0.0
    m = math.fsum(xs) / k
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (k - 1)) / math.sqrt(k)


def proportion(values: Sequence[float | None], n_per_seed: int) -> Estimate:
    """A proportion measured on each seed over ``n_per_seed`` samples (see the module docstring)."""
    xs = _clean(values)
    if n_per_seed < 1:
        raise ValueError(f"proportion: n_per_seed must be positive, got {n_per_seed}")
    if any(x < 0 or x > 1 for x in xs):
        raise ValueError(f"proportion: values must lie in [0, 1], got {xs}")
    k = len(xs)
    n = n_per_seed * k
    mean = math.fsum(xs) / k
    p = (mean * n + 1) / (n + 2)
    se = max(math.sqrt(p * (1 - p) / (n + 2)), _seed_se(xs))
    return Estimate(mean, se, Z95, tuple(xs), (0.0, 1.0))


def mean_of(values: Sequence[float | None], *, exact: bool = False,
            bounds: tuple[float, float] | None = None) -> Estimate:
    """The mean over seeds with a t interval (``exact``: the figure has no noise;
    ``bounds``: the figure's range, which clips the interval)."""
    xs = _clean(values)
    k = len(xs)
    mean = math.fsum(xs) / k
    if exact:
        return Estimate(mean, _seed_se(xs), Z95 if k < 2 else t_quantile(k - 1), tuple(xs), bounds)
    if k < 2:
        return Estimate(mean, math.inf, Z95, tuple(xs), bounds)
    return Estimate(mean, _seed_se(xs), t_quantile(k - 1), tuple(xs), bounds)


def difference(a: Estimate, b: Estimate) -> Estimate:
    """``a − b`` for independent estimates."""
    return Estimate(a.mean - b.mean, math.hypot(a.se, b.se), max(a.q, b.q))


def ratio(a: Estimate, b: Estimate) -> Estimate:
    """``a / b`` (delta method) for independent estimates with ``b`` away from 0."""
    if b.mean == 0:
        raise ValueError("ratio: the denominator's mean is 0")
    r = a.mean / b.mean
    rel = math.hypot(a.se / abs(a.mean), b.se / abs(b.mean)) if a.mean else math.inf
    return Estimate(r, abs(r) * rel, max(a.q, b.q))


@dataclass(frozen=True)
class Verdict:
    """A verdict and the one-line test that produced it."""

    verdict: str
    test: str

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


def _interval(d: Estimate) -> str:
    return f"[{d.lo:+.3f}, {d.hi:+.3f}]"


def verdict_at_least(a: Estimate, b: Estimate, margin: float, *, floor: float | None = None) -> Verdict:
    """``a ≥ b − margin``: the 95 % interval of ``a − b`` against ``−margin``.
    ``floor``: when the reference ``b`` scores below it, nothing can fall
    ``margin`` behind it, so "a keeps up with b" says nothing — inconclusive."""
    if margin < 0:
        raise ValueError(f"verdict_at_least: margin must be non-negative, got {margin}")
    d = difference(a, b)
    test = f"a − b = {d.mean:+.3f} {_interval(d)} vs −{margin:g}"
    if floor is not None and b.mean < floor:
        return Verdict(UNSURE, test + f"; the reference ({b.mean:.3f}) is below the floor {floor:g}")
    if d.lo >= -margin:
        return Verdict(HOLDS, test)
    if d.hi < -margin:
        return Verdict(FAILS, test)
    return Verdict(UNSURE, test)


def verdict_greater(a: Estimate, b: Estimate) -> Verdict:
    """``a > b``: the 95 % interval of ``a − b`` against 0."""
    d = difference(a, b)
    test = f"a − b = {d.mean:+.3f} {_interval(d)} vs 0"
    if d.lo > 0:
        return Verdict(HOLDS, test)
    if d.hi <= 0:
        return Verdict(FAILS, test)
    return Verdict(UNSURE, test)


def verdict_threshold(x: Estimate, threshold: float) -> Verdict:
    """``x ≥ threshold``: the 95 % interval of ``x`` against the threshold."""
    test = f"{x.mean:.3f} [{x.lo:.3f}, {x.hi:.3f}] vs ≥ {threshold:g}"
    if x.lo >= threshold:
        return Verdict(HOLDS, test)
    if x.hi < threshold:
        return Verdict(FAILS, test)
    return Verdict(UNSURE, test)


def _oriented(points: Sequence[Estimate], higher_is_better: bool) -> list[Estimate]:
    if len(points) < 3:
        raise ValueError(f"need at least 3 points, got {len(points)}")
    if higher_is_better:
        return list(points)
    return [Estimate(-p.mean, p.se, p.q, tuple(-v for v in p.values)) for p in points]


def verdict_u_shape(points: Sequence[Estimate], *, higher_is_better: bool = True) -> Verdict:
    """Quality over an ordered sweep rises, then falls: the best inside point
    beats both ends (both intervals of the difference above 0). Does not
    hold when one end beats every inside point (the curve is monotone)."""
    pts = _oriented(points, higher_is_better)
    inner = range(1, len(pts) - 1)
    best = max(inner, key=lambda i: pts[i].mean)
    d_first, d_last = difference(pts[best], pts[0]), difference(pts[best], pts[-1])
    test = (f"best inside point #{best}: vs first {d_first.mean:+.3f} {_interval(d_first)}, "
            f"vs last {d_last.mean:+.3f} {_interval(d_last)}")
    if d_first.lo > 0 and d_last.lo > 0:
        return Verdict(HOLDS, test)
    for end in (pts[0], pts[-1]):
        if all(difference(end, pts[i]).lo > 0 for i in inner):
            return Verdict(FAILS, test + "; an end beats every inside point")
    return Verdict(UNSURE, test)


def verdict_saturates(points: Sequence[Estimate], margin: float, *, higher_is_better: bool = True) -> Verdict:
    """More of something helps up to a point: the best point after the first
    beats the first (interval above 0) and the last point adds at most
    ``margin`` over the point before it (interval of the gain below
    ``margin``). Does not hold when nothing beats the first (every interval
    at or below 0) or the last step still gains more than ``margin``."""
    pts = _oriented(points, higher_is_better)
    later = range(1, len(pts))
    best = max(later, key=lambda i: pts[i].mean)
    helps = difference(pts[best], pts[0])
    last = difference(pts[-1], pts[-2])
    test = (f"best #{best} − first = {helps.mean:+.3f} {_interval(helps)}; "
            f"last − previous = {last.mean:+.3f} {_interval(last)} vs < {margin:g}")
    if helps.lo > 0 and last.hi < margin:
        return Verdict(HOLDS, test)
    if all(difference(pts[i], pts[0]).hi <= 0 for i in later) or last.lo > margin:
        return Verdict(FAILS, test)
    return Verdict(UNSURE, test)


def combine(*parts: Verdict) -> Verdict:
    """All parts hold → holds; any part does not hold → does not hold; else inconclusive."""
    if not parts:
        raise ValueError("combine: no verdicts")
    test = "; ".join(p.test for p in parts)
    if any(p.verdict == FAILS for p in parts):
        return Verdict(FAILS, test)
    if all(p.verdict == HOLDS for p in parts):
        return Verdict(HOLDS, test)
    return Verdict(UNSURE, test)


# ---------------------------------------------------------------------------
# Budgets and the recipe
# ---------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "bench" / "claims-recipe.toml"
N_CLASSES = 3  # shapes: circle, square, triangle

# margins of the claims, in shapes_valid points (absolute fractions)
NEAR = 0.10      # "matches", "near", "loses little", "same quality"
MODEST = 0.15    # "a modest quality loss"
SMALL = 0.10     # "a small quality cost"
FAR_FEWER = 0.5  # "far fewer passes": at most half of raster's NFE
FLOOR = 0.2      # a "keeps up with the reference" test needs the reference's validity at least this high


@dataclass(frozen=True)
class Budget:
    """One size of the study (see the module docstring)."""

    name: str
    size: int
    n: int
    n_holdout: int
    downsample: int
    codebook: int
    tokenizer_steps: int
    model: tuple[int, int, int]  # n_layer, d_model, n_head
    batch_size: int
    lr: float
    warmup: int
    top_steps: int  # raster steps at the top budget: the FLOPs every order gets there
    fractions: tuple[float, ...]
    seeds: tuple[int, ...]
    n_samples: int
    cfg_scales: tuple[float, ...]
    masked_steps: tuple[int, ...]
    fid_recipe_steps: int
    top_k: int
    cfg_scale: float | None  # guidance in the base chain (None: the conditional logits, no guidance)
    # orders trained at every budget fraction (the quality-vs-FLOPs curves); () = every order. The
    # others, and RAR, train at the top budget only
    curve_orders: tuple[str, ...] = ()
    # seeds at the top budget of the orders outside curve_orders (None: ``seeds``); one seed's
    # validity still has its interval over samples (Agresti–Caffo)
    other_seeds: tuple[int, ...] | None = None
    # [model] and [train] keys of the recipe beyond the ones above (e.g. cond = "adaln", label_dropout)
    model_options: tuple[tuple[str, Any], ...] = ()
    train_options: tuple[tuple[str, Any], ...] = ()
    recipe_steps: int | None = None  # the recipe's own train.steps (said in the header; not the study's)


CURVES = ("raster", "masked", "next-scale", "random")

BUDGETS = {
    "smoke": Budget("smoke", size=16, n=800, n_holdout=64, downsample=4, codebook=64, tokenizer_steps=30,
                    model=(1, 32, 2), batch_size=16, lr=2e-3, warmup=5, top_steps=30, fractions=(0.5, 1.0),
                    seeds=(0, 1), n_samples=16, cfg_scales=(1.0, 2.0, 4.0), masked_steps=(2, 4, 8),
                    fid_recipe_steps=20, top_k=16, cfg_scale=None, curve_orders=CURVES, other_seeds=(0,)),
    # small: full's plan (the recipe's tokenizer and backbone, the same orders, seeds and sweeps) at a
    # quarter of its training budget, with shorter tokenizer fits and fewer samples — a run that fits
    # in well under an hour of a loaded 2-core machine
    "small": Budget("small", size=16, n=4000, n_holdout=200, downsample=2, codebook=512, tokenizer_steps=600,
                    model=(4, 128, 4), batch_size=64, lr=1e-3, warmup=50, top_steps=100,
                    fractions=(0.25, 0.5, 1.0), seeds=(0, 1), n_samples=64, cfg_scales=(1.0, 1.5, 2.5, 4.0),
                    masked_steps=(2, 4, 8, 16), fid_recipe_steps=500,
                    top_k=16, cfg_scale=None, curve_orders=CURVES, other_seeds=(0,)),
    # full: cut to fit 60 minutes of an idle 2-core CPU from scratch (``--estimate``; see cuts())
    "full": Budget("full", size=16, n=4000, n_holdout=200, downsample=2, codebook=512, tokenizer_steps=1200,
                   model=(4, 128, 4), batch_size=64, lr=1e-3, warmup=100, top_steps=375,
                   fractions=(0.25, 0.5, 1.0), seeds=(0, 1), n_samples=128, cfg_scales=(1.0, 1.5, 2.5, 4.0),
                   masked_steps=(2, 4, 8, 16, 32), fid_recipe_steps=500,
                   top_k=16, cfg_scale=None, curve_orders=CURVES, other_seeds=(0,)),
}

#: why the curve orders are these (said in docs/claims.md when the budget cuts the curves)
CURVES_WHY = ("`raster` is the reference of most claims; `next-scale` (VAR), `masked` (MaskGIT) and `random` "
              "(RandAR) are the three other families of the seeds — by scale, by masked parallel steps, in any "
              "order — and the ones whose FLOP matching differs most from raster's (`next-scale` 130 tokens "
              "per sequence, `random` twice raster's), so where equal training FLOPs matter most")


def apply_recipe(budget: Budget, path: Path) -> tuple[Budget, str]:
    """The budget with the recipe file's data, tokenizer, backbone (every
    ``[model]`` key: ``cond = "adaln"`` included), training and sampler
    settings (those it names; never for ``smoke``; its tokenizer steps for
    ``full`` only). The recipe's ``train.steps`` is not the study's top budget
    (the budget's ``top_steps`` is: the study trains ~20 models), only
    reported. Returns the budget and a line saying where the recipe came from."""
    if budget.name == "smoke" or not path.is_file():
        return budget, "built-in recipe (bench/claims.py BUDGETS)"
    from tokenloom.config import read_toml

    raw = read_toml(path)
    changes: dict[str, Any] = {}
    data, tok, model, train = (raw.get(k, {}) for k in ("data", "tokenizer", "model", "train"))
    for key in ("size", "n", "n_holdout"):
        if isinstance(data.get(key), int):
            changes[key] = data[key]
    if tok.get("name") == "vq":
        if isinstance(tok.get("downsample"), int):
            changes["downsample"] = tok["downsample"]
        if isinstance(tok.get("codebook_size"), int):
            changes["codebook"] = tok["codebook_size"]
        if isinstance(tok.get("steps"), int) and budget.name == "full":  # small keeps its shorter fits
            changes["tokenizer_steps"] = tok["steps"]
    if all(isinstance(model.get(k), int) for k in ("n_layer", "d_model", "n_head")):
        changes["model"] = (model["n_layer"], model["d_model"], model["n_head"])
    changes["model_options"] = tuple((k, v) for k, v in model.items() if k not in ("n_layer", "d_model", "n_head"))
    for key, field in (("batch_size", "batch_size"), ("lr", "lr"), ("warmup", "warmup")):
        if isinstance(train.get(key), (int, float)):
            changes[field] = train[key]
    changes["train_options"] = tuple((k, v) for k, v in train.items()
                                     if k not in ("steps", "batch_size", "lr", "warmup"))
    if isinstance(train.get("steps"), int):  # said in the header; the study's top budget is the budget's own
        changes["recipe_steps"] = train["steps"]
    for s in raw.get("sampler", []):
        if s.get("name") == "top-k" and isinstance(s.get("k"), int):
            changes["top_k"] = s["k"]
        if s.get("name") == "cfg" and isinstance(s.get("scale"), (int, float)):
            changes["cfg_scale"] = float(s["scale"])
    where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
    dropped = not_carried_over(raw)
    if dropped:  # said in the header, so a recipe the study does not follow is never mistaken for one it does
        where += f" (not carried over: {', '.join(dropped)})"
    return replace(budget, **changes), where


def not_carried_over(raw: dict[str, Any]) -> list[str]:
    """The recipe settings :func:`apply_recipe` does not apply to the study: tokenizer options other
    than a ``vq``'s downsample, codebook and steps (e.g. ``encoder = "patchwise"``: the study's
    tokenizers keep their conv encoders, which the codebook-usage claims need), and samplers other
    than top-k and cfg (e.g. top-p)."""
    tok = raw.get("tokenizer", {})
    out = [f"tokenizer {tok.get('name')!r}"] if tok and tok.get("name") != "vq" else []
    out += [f"tokenizer.{k}" for k in tok if k not in ("name", "downsample", "codebook_size", "steps")]
    out += [f"sampler {s.get('name')!r}" for s in raw.get("sampler", []) if s.get("name") not in ("top-k", "cfg")]
    return out


def grid_side(b: Budget) -> int:
    return b.size // b.downsample


def chain(b: Budget, scale: float | None = None) -> list[dict]:
    """The sampler chain: guidance (``scale``, else the budget's, if any), then top-k."""
    scale = b.cfg_scale if scale is None else scale
    return ([] if scale is None else [{"name": "cfg", "scale": scale}]) + [{"name": "top-k", "k": b.top_k}]


def same_vocabulary(codebook: int) -> tuple[list[int], int, int]:
    """FSQ levels and LFQ bits (and LFQ's entropy groups, which must divide
    them) giving ``codebook`` codes, the vocabulary of ``vq`` (a power of 2)."""
    bits = round(math.log2(codebook))
    if 2 ** bits != codebook or bits < 3:
        raise ValueError(f"the codebook study needs a power-of-2 codebook of at least 8 codes, got {codebook}")
    levels = [2 ** (bits // 3 + (i < bits % 3)) for i in range(3)]
    groups = next(g for g in (2, 3, 1) if bits % g == 0)
    return levels, bits, groups


def tokenizers(b: Budget) -> dict[str, dict]:
    """The tokenizer tables of the study, by label."""
    h = grid_side(b)
    scales = [s for s in (1, 2, 3, 4, 6, 8, 12, 16) if s <= h]
    common = {"downsample": b.downsample, "steps": b.tokenizer_steps}
    levels, bits, groups = same_vocabulary(b.codebook)
    return {
        "vq": {"name": "vq", "codebook_size": b.codebook, **common},
        "vq-no-restart": {"name": "vq", "codebook_size": b.codebook, **common, "restart_every": 0},
        "fsq": {"name": "fsq", "levels": levels, **common},
        "lfq": {"name": "lfq", "bits": bits, "entropy_groups": groups, **common},
        "multiscale": {"name": "multiscale", "codebook_size": b.codebook, **common, "scales": scales},
        # RQ-Transformer at vq's code budget: (h/2)² positions × depth 4 = h² codes, the same vocabulary
        "rq": {"name": "rq", "codebook_size": b.codebook, "depth": 4, "downsample": 2 * b.downsample,
               "steps": b.tokenizer_steps},
        "frequency": {"name": "frequency", "levels": 3, "drop_levels": 1, "bins": 3},
    }


@dataclass(frozen=True)
class Order:
    """A trained order: its label, generator table and tokenizer, and the
    decoders run in the same grid at the same steps (sharing its model, or —
    RAR — its spec and so its FLOPs per step)."""

    label: str
    table: dict
    tokenizer: str
    extra: tuple[tuple[str, dict], ...] = ()


def orders(b: Budget) -> list[Order]:
    h = grid_side(b)
    L = h * h
    return [
        Order("raster", {"name": "raster"}, "vq",
              (("raster-rar", {"name": "raster", "rar": True}), ("zipar", {"name": "zipar", "window": max(1, h // 2)}))),
        Order("random", {"name": "random"}, "vq",
              (("random-parallel", {"name": "random-parallel", "steps": max(2, L // 4)}),)),
        Order("masked", {"name": "masked", "steps": 8}, "vq"),
        Order("next-block", {"name": "next-block", "rows": 1}, "vq"),
        Order("next-cell", {"name": "next-cell", "cell": 2}, "vq"),
        Order("neighboring", {"name": "neighboring"}, "vq"),
        Order("par", {"name": "par", "regions": 4}, "vq"),
        Order("next-scale", {"name": "next-scale"}, "multiscale"),
        Order("next-scale-markov", {"name": "next-scale-markov"}, "multiscale"),
        Order("depth-stack", {"name": "depth-stack", "depth_layers": 1}, "rq"),
        Order("next-frequency", {"name": "next-frequency"}, "frequency"),
    ]


def base_doc(b: Budget, *, steps: int, metrics: list[str] | None = None) -> dict:
    """A run config (the grid's base) for this budget."""
    names = metrics or ["shapes-oracle", "fid", "nll", "cost", "acceptance"]
    m: dict[str, Any] = {"names": names, "n_samples": b.n_samples}
    if "fid" in names:
        m["fid"] = {"recipe_steps": b.fid_recipe_steps}
    return {
        "seed": b.seeds[0],
        "data": {"name": "shapes", "size": b.size, "n": b.n, "n_holdout": b.n_holdout},
        "tokenizer": tokenizers(b)["vq"],
        "generator": {"name": "raster"},
        "model": {"n_layer": b.model[0], "d_model": b.model[1], "n_head": b.model[2], **dict(b.model_options)},
        "train": {"steps": steps, "batch_size": b.batch_size, "lr": b.lr, "warmup": b.warmup,
                  **dict(b.train_options)},
        "sampler": chain(b),
        "metrics": m,
        "device": "cpu",
    }


def flops_per_step(b: Budget, order: Order) -> float:
    """Training FLOPs of one step of ``order`` (the trainer's count)."""
    from tokenloom.config import build_component, parse_config
    from tokenloom.model import build_model
    from tokenloom.registry import get_registry

    registry = get_registry()
    raw = base_doc(b, steps=1)
    raw["tokenizer"], raw["generator"] = tokenizers(b)[order.tokenizer], dict(order.table)
    cfg = parse_config(raw, registry=registry, source="bench/claims.py")
    tok = build_component(registry, "tokenizer", cfg.tokenizer.name,
                          {**cfg.tokenizer.options, "image_shape": (3, b.size, b.size)}, path="tokenizer")
    gen = build_component(registry, "generator", cfg.generator.name,
                          {**cfg.generator.options, "tokenizer": tok}, path="generator")
    spec = gen.model_spec()
    model = build_model(spec, cfg.model, n_classes=N_CLASSES, seed=0)
    return float(b.batch_size * spec.seq_len * model.flops_per_token(spec.seq_len))


def with_study_warmup(b: Budget, steps: dict[str, list[int]]) -> Budget:
    """The budget with one warm-up for every model of the study: the recipe's,
    or the smallest step count when that is shorter. One value, so that the
    sweeps at the top budget reuse the models the orders grids trained (the
    warm-up is part of a model's cache key)."""
    return replace(b, warmup=min([b.warmup] + [min(v) for v in steps.values()]))


def steps_at_budgets(b: Budget, per_step: dict[str, float]) -> dict[str, list[int]]:
    """Each order's training steps at each budget fraction: the raster FLOPs of
    ``fraction · top_steps`` raster steps spent at the order's own cost per step."""
    raster = per_step["raster"]
    return {label: [max(1, round(f * b.top_steps * raster / cost)) for f in b.fractions]
            for label, cost in per_step.items()}


# ---------------------------------------------------------------------------
# Grids (written as TOML files) and running them
# ---------------------------------------------------------------------------


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def to_toml(doc: dict, comment: str = "") -> str:
    """A grid document as TOML: top-level scalars, then one table per section
    (nested tables and tables of tables as inline tables, the sampler chain as
    ``[[sampler]]``)."""
    lines = [f"# {c}".rstrip() for c in comment.splitlines()] + ([""] if comment else [])
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in doc.items() if not isinstance(v, (dict, list))]
    for k, v in doc.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{_toml_key(kk)} = {_toml_value(vv)}" for kk, vv in v.items()
                                      if not (isinstance(vv, dict) and kk == "sweep")]
            if isinstance(v.get("sweep"), dict):
                lines += ["", f"[{k}.sweep]"] + [f"{_toml_key(kk)} = {_toml_value(vv)}"
                                                 for kk, vv in v["sweep"].items()]
        elif isinstance(v, list):
            for t in v:
                lines += ["", f"[[{k}]]"] + [f"{_toml_key(kk)} = {_toml_value(vv)}" for kk, vv in t.items()]
    return "\n".join(lines) + "\n"


@dataclass
class Study:
    """A grid of the study: its name, the document, and the label of each
    generator / tokenizer table in it (for reading the runs back)."""

    name: str
    doc: dict
    gen_labels: dict[str, dict]
    comment: str = ""


def on_curve(b: Budget, label: str) -> bool:
    """Whether the order is trained at every budget fraction (else at the top budget only)."""
    return not b.curve_orders or label in b.curve_orders


def top_seeds(b: Budget, label: str) -> tuple[int, ...]:
    """The seeds of an order's top budget: ``seeds`` on the curves, ``other_seeds`` elsewhere."""
    return b.seeds if on_curve(b, label) or b.other_seeds is None else b.other_seeds


def order_grids(b: Budget, steps: dict[str, list[int]]) -> list[Study]:
    """One grid per trained order. A curve order: every budget on the first
    seed, the top budget on every seed (RAR beside raster at the top budget
    only; the decoders sharing the model at every budget). Any other order:
    its top budget on ``top_seeds``."""
    out = []
    for o in orders(b):
        doc = base_doc(b, steps=max(steps[o.label]))
        doc["tokenizer"] = tokenizers(b)[o.tokenizer]
        doc["generator"] = dict(o.table)
        seeds = top_seeds(b, o.label)
        values = sorted(set(steps[o.label])) if on_curve(b, o.label) else [max(steps[o.label])]
        top = max(values)
        grid: dict[str, Any] = {"generator": [dict(o.table)] + [dict(t) for _, t in o.extra],
                                "seed": list(seeds)}
        exclude: list[dict] = [{"seed": s, "train.steps": v} for s in seeds[1:] for v in values if v != top]
        exclude += [{"generator": dict(t), "train.steps": v} for label, t in o.extra if label in TOP_ONLY
                    for v in values if v != top]
        if exclude:
            grid["exclude"] = exclude
        if len(values) > 1:
            grid["sweep"] = {"train.steps": values}
        doc["grid"] = grid
        labels = {o.label: o.table, **{k: t for k, t in o.extra}}
        where = (f"{', '.join(map(str, values))} steps" if len(values) > 1 else
                 f"{top} steps (the top budget only)")
        out.append(Study(f"orders-{o.label}", doc, labels,
                         f"{o.label} at equal training FLOPs: {where} "
                         f"(raster's budgets: {', '.join(str(round(f * b.top_steps)) for f in b.fractions)})"))
    return out


#: trained variants beside an order (their own models) that run at the top budget only
TOP_ONLY = ("raster-rar",)


def top_grids(b: Budget, steps: dict[str, list[int]]) -> list[Study]:
    """The sweeps and decoders at the top budget."""
    raster_top, masked_top = max(steps["raster"]), max(steps["masked"])
    base_chain = chain(b)
    spec = {"name": "speculative", "gamma": 4}
    dec = base_doc(b, steps=raster_top)
    dec["grid"] = {"generator": [{"name": "raster"}, {"name": "sjd"}, dict(spec)],
                   "sampler": [base_chain, base_chain + [{"name": "lantern"}], base_chain + [{"name": "gsd"}]],
                   "seed": list(top_seeds(b, "raster")),
                   "exclude": [{"generator": "raster", "sampler": "lantern"}, {"generator": "raster", "sampler": "gsd"}]}
    cfg = base_doc(b, steps=raster_top)
    cfg["sampler"] = chain(b, scale=1.0)
    cfg["grid"] = {"seed": list(top_seeds(b, "raster")), "sweep": {"sampler.cfg.scale": list(b.cfg_scales)}}
    masked = base_doc(b, steps=masked_top)
    masked["generator"] = {"name": "masked", "steps": 8}
    masked["grid"] = {"seed": list(top_seeds(b, "masked")), "sweep": {"generator.steps": list(b.masked_steps)}}
    toks = tokenizers(b)
    book = base_doc(b, steps=1, metrics=["codebook", "reconstruction"])
    book["metrics"]["reconstruction"] = {"recipe_steps": b.fid_recipe_steps}  # the extractor FID uses
    book["train"]["warmup"] = 0
    book["metrics"]["n_samples"] = 16
    book["grid"] = {"tokenizer": [toks[k] for k in ("vq", "vq-no-restart", "fsq", "lfq")], "seed": list(b.seeds)}
    return [
        Study("decoders", dec, {"raster": {"name": "raster"}, "sjd": {"name": "sjd"}, "speculative": spec},
              "decoders of the raster model at the top budget: exact, LANTERN and GSD acceptance"),
        Study("cfg", cfg, {"raster": {"name": "raster"}}, "raster at the top budget, guidance scale swept"),
        Study("masked-steps", masked, {f"masked-{s}": {"name": "masked", "steps": s} for s in b.masked_steps},
              "one MaskGIT model, decoded in T steps"),
        Study("codebook", book, {"raster": {"name": "raster"}},
              "codebook use on held-out codes (the backbone is a 1-step placeholder: only the tokenizer counts)"),
    ]


def _subset(table: dict, full: dict) -> bool:
    return all(full.get(k) == v for k, v in table.items())


def _label_of(tables: dict[str, dict], full: dict) -> str | None:
    hits = [(len(t), label) for label, t in tables.items() if _subset(t, full)]
    return max(hits)[1] if hits else None


def tokenizer_label(table: dict) -> str:
    if table.get("name") == "vq" and table.get("restart_every") == 0:
        return "vq-no-restart"
    return str(table.get("name"))


def run_record(study: str, rec: dict, gen_labels: dict[str, dict]) -> dict:
    """A flat view of one pipeline record: what the claims read."""
    cfg = rec["config"]
    chain = cfg.get("sampler", [])
    return {
        "study": study,
        "label": _label_of(gen_labels, cfg["generator"]) or cfg["generator"]["name"],
        "tokenizer": tokenizer_label(cfg["tokenizer"]),
        "seed": cfg.get("seed", 0),
        "steps": cfg["train"]["steps"],
        "chain": tuple(s["name"] for s in chain),
        "cfg": next((s.get("scale") for s in chain if s["name"] == "cfg"), None),
        "n": cfg["metrics"]["n_samples"],
        "metrics": rec["metrics"],
        "flops": rec["metrics"].get("train_flops") or (rec.get("train") or {}).get("flops"),
        "samples": rec.get("artifacts", {}).get("samples"),
        "region": rec.get("region"),
    }


def run_study(study: Study, out: Path, *, progress: bool) -> list[dict]:
    """Write the grid file and run it through :func:`tokenloom.ablation.run_ablation`
    into ``out`` (the shared cache); keep a copy of its report under ``out/reports``."""
    from tokenloom.ablation import run_ablation

    path = out / "grids" / f"{study.name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_toml(study.doc, study.comment), encoding="utf-8")
    report = run_ablation(path, out, progress=progress, plots=False,
                          echo=lambda msg: print(f"[{study.name}] {msg}", flush=True))
    reports = out / "reports"
    reports.mkdir(exist_ok=True)
    if (out / "results.md").is_file():
        shutil.copyfile(out / "results.md", reports / f"{study.name}.md")
    return [run_record(study.name, r, study.gen_labels) for r in report.get("runs", [])]


def finished_runs(study: Study, out: Path) -> tuple[list[dict], int]:
    """The study's cells already finished under ``out`` (nothing is run) and how many cells it plans."""
    from tokenloom.ablation import finished_record, plan_grid

    plan = plan_grid(study.doc)
    runs = []
    for pc in plan.cells:
        rec = finished_record(out, pc)
        if rec is not None:
            runs.append(run_record(study.name, rec, study.gen_labels))
    return runs, len(plan.cells)


def inpainting_doc(b: Budget, steps: dict[str, list[int]], seed: int) -> dict:
    """The run config of the inpainting check: the top-budget ``random`` model of the orders grid."""
    raw = base_doc(b, steps=max(steps["random"]), metrics=["shapes-oracle", "cost"])
    raw["generator"], raw["seed"] = {"name": "random"}, seed
    return raw


def run_inpainting(b: Budget, steps: dict[str, list[int]], out: Path, *, progress: bool) -> list[dict]:
    """RandAR's zero-shot inpainting: the top-budget ``random`` model regenerates
    the centre of held-out images (one run per seed, same shared cache)."""
    from tokenloom.config import parse_config
    from tokenloom.pipeline import run

    runs = []
    for seed in top_seeds(b, "random"):
        cfg = parse_config(inpainting_doc(b, steps, seed), source="bench/claims.py (inpainting)")
        print(f"[inpainting] random, region center, seed {seed}", flush=True)
        rec = run(cfg, out, region="center", progress=progress, write_report=False)
        runs.append(run_record("inpainting", rec, {"random": {"name": "random"}}))
    return runs


# ---------------------------------------------------------------------------
# Reading the figures back
# ---------------------------------------------------------------------------


class Missing(Exception):
    """A figure a claim needs was not measured (a skipped or failed cell)."""


def pick(runs: list[dict], **want: Any) -> list[dict]:
    """The runs whose fields equal ``want`` (``steps="top"``: the largest steps among the matches)."""
    top = want.pop("steps", None) == "top"
    hits = [r for r in runs if all(r.get(k) == v for k, v in want.items())]
    if top and hits:
        best = max(r["steps"] for r in hits)
        hits = [r for r in hits if r["steps"] == best]
    if not hits:
        raise Missing(", ".join(f"{k}={v}" for k, v in want.items()) + (" at the top budget" if top else ""))
    return hits


def _values(runs: list[dict], key: str) -> list[float]:
    xs = [r["metrics"].get(key) for r in runs]
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        raise Missing(f"{key} of {runs[0]['study']}/{runs[0]['label']}")
    return xs


def valid(runs: list[dict]) -> Estimate:
    """``shapes_valid`` over the runs' seeds, as a proportion of their samples."""
    return proportion(_values(runs, "shapes_valid"), runs[0]["n"])


def nfe(runs: list[dict], *, exact: bool = True) -> Estimate:
    return mean_of(_values(runs, "nfe"), exact=exact)


def fid(runs: list[dict]) -> Estimate:
    return mean_of(_values(runs, "fid"), bounds=(0.0, math.inf))


def accept(runs: list[dict]) -> Estimate:
    """The acceptance rate as a proportion over the runs' *images* (a conservative count: every
    image drafts many tokens)."""
    return proportion(_values(runs, "acceptance_rate"), runs[0]["n"])


def utilisation(runs: list[dict]) -> Estimate:
    return mean_of(_values(runs, "codebook_utilisation"), bounds=(0.0, 1.0))


def top(runs: list[dict], order: str, label: str | None = None) -> list[dict]:
    """An order's runs at the top budget in its orders grid."""
    return pick(runs, study=f"orders-{order}", label=label or order, steps="top")


# ---------------------------------------------------------------------------
# The claims: each a function of the runs -> figures and a verdict
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """A headline claim: the paper, the claim in one line, the stated test in words and the
    function that measures it: ``check(runs) -> (figures, Verdict)``."""

    paper: str
    claim: str
    rule: str
    check: Any


def _q(name: str, e: Estimate) -> str:
    return f"{name} valid {e.text()}"


def _speedup(fast: list[dict], slow: list[dict], *, exact_fast: bool = True) -> Estimate:
    return ratio(nfe(slow), nfe(fast, exact=exact_fast))


def fewer_passes_claim(order: str, label: str | None = None):
    """Far fewer passes than raster (NFE speed-up ≥ 1/FAR_FEWER) at a modest quality loss."""
    def check(runs):
        r, o = top(runs, "raster"), top(runs, order, label)
        sp = _speedup(o, r)
        figures = f"{_q(label or order, valid(o))}; {_q('raster', valid(r))}; NFE {nfe(o).mean:.1f} vs {nfe(r).mean:.1f}"
        return figures, combine(verdict_threshold(sp, 1 / FAR_FEWER), verdict_at_least(valid(o), valid(r), MODEST, floor=FLOOR))
    return check


def var_claim(runs):
    r, v = top(runs, "raster"), top(runs, "next-scale")
    sp = _speedup(v, r)
    return (f"{_q('next-scale', valid(v))}; {_q('raster', valid(r))}; NFE {nfe(v).mean:.1f} vs {nfe(r).mean:.1f}",
            combine(verdict_at_least(valid(v), valid(r), NEAR, floor=FLOOR), verdict_threshold(sp, 2.0)))


def maskgit_near_claim(runs):
    r, m = top(runs, "raster"), top(runs, "masked")
    return (f"{_q('masked (8 steps)', valid(m))}; {_q('raster', valid(r))}; NFE {nfe(m).mean:.0f} vs {nfe(r).mean:.0f}",
            verdict_at_least(valid(m), valid(r), NEAR, floor=FLOOR))


def maskgit_steps_claim(runs):
    sweep = pick(runs, study="masked-steps")
    labels = sorted({r["label"] for r in sweep}, key=lambda s: int(s.split("-")[-1]))
    pts = [valid(pick(sweep, label=lab)) for lab in labels]
    fig = "; ".join(f"T={lab.split('-')[-1]}: {p.text()}" for lab, p in zip(labels, pts))
    return fig, verdict_saturates(pts, NEAR)


def randar_claim(runs):
    r, x = top(runs, "raster"), top(runs, "random")
    return f"{_q('random', valid(x))}; {_q('raster', valid(r))}", verdict_at_least(valid(x), valid(r), NEAR, floor=FLOOR)


def randar_parallel_claim(runs):
    x, p = top(runs, "random"), top(runs, "random", "random-parallel")
    return ((f"{_q('random-parallel', valid(p))} at NFE {nfe(p).mean:.0f}; {_q('random', valid(x))} at NFE "
            f"{nfe(x).mean:.0f}"), combine(verdict_at_least(valid(p), valid(x), NEAR, floor=FLOOR),
                                          verdict_threshold(_speedup(p, x), 2.0)))


def randar_inpaint_claim(runs):
    x, i = top(runs, "random"), pick(runs, study="inpainting")
    return (f"inpainted (centre regenerated) valid {valid(i).text()}; unconditional {_q('random', valid(x))}",
            verdict_at_least(valid(i), valid(x), NEAR, floor=FLOOR))


def rar_claim(runs):
    r, a = top(runs, "raster"), top(runs, "raster", "raster-rar")
    return f"{_q('raster + RAR', valid(a))}; {_q('raster', valid(r))}", verdict_greater(valid(a), valid(r))


def _decoder(runs, label, chain_has: str | None):
    sel = pick(runs, study="decoders", label=label)
    if chain_has is None:
        sel = [r for r in sel if not ({"lantern", "gsd"} & set(r["chain"]))]
    else:
        sel = [r for r in sel if chain_has in r["chain"]]
    if not sel:
        raise Missing(f"decoders/{label} with {chain_has or 'exact acceptance'}")
    return sel


def sjd_claim(runs):
    r, s = _decoder(runs, "raster", None), _decoder(runs, "sjd", None)
    sp = _speedup(s, r, exact_fast=False)
    return (f"{_q('sjd', valid(s))}; {_q('raster', valid(r))}; NFE speed-up {sp.text()}",
            combine(verdict_at_least(valid(s), valid(r), NEAR, floor=FLOOR), verdict_threshold(sp, 2.0)))


def relaxed_claim(label: str, rule: str):
    def check(runs):
        e, x = _decoder(runs, label, None), _decoder(runs, label, rule)
        return ((f"{label}+{rule}: acceptance {accept(x).text()}, valid {valid(x).text()}; exact: acceptance "
                f"{accept(e).text()}, valid {valid(e).text()}"),
                combine(verdict_greater(accept(x), accept(e)), verdict_at_least(valid(x), valid(e), SMALL, floor=FLOOR)))
    return check


def _cfg_points(runs):
    sweep = pick(runs, study="cfg")
    scales = sorted({r["cfg"] for r in sweep})
    return scales, [pick(sweep, cfg=s) for s in scales]


def cfg_valid_claim(runs):
    scales, groups = _cfg_points(runs)
    pts = [valid(g) for g in groups]
    return "; ".join(f"s={s:g}: {p.text()}" for s, p in zip(scales, pts)), verdict_u_shape(pts)


def cfg_fid_claim(runs):
    scales, groups = _cfg_points(runs)
    pts = [fid(g) for g in groups]
    return ("; ".join(f"s={s:g}: FID {p.text(1)}" for s, p in zip(scales, pts)),
            verdict_u_shape(pts, higher_is_better=False))


def hmar_claim(runs):
    v, h = top(runs, "next-scale"), top(runs, "next-scale-markov")
    return ((f"{_q('next-scale-markov', valid(h))} at NFE {nfe(h).mean:.0f}; {_q('next-scale', valid(v))} at NFE "
            f"{nfe(v).mean:.0f}"), verdict_greater(valid(h), valid(v)))


def rq_claim(runs):
    r, d = top(runs, "raster"), top(runs, "depth-stack")
    return ((f"{_q('depth-stack', valid(d))} at NFE {nfe(d).mean:.0f}; {_q('raster', valid(r))} at NFE "
            f"{nfe(r).mean:.0f} (same number of codes and vocabulary)"),
            combine(verdict_at_least(valid(d), valid(r), NEAR, floor=FLOOR), verdict_threshold(_speedup(d, r), 2.0)))


def codebook_claim(name: str):
    def check(runs):
        book = pick(runs, study="codebook")
        x, v = utilisation(pick(book, tokenizer=name)), utilisation(pick(book, tokenizer="vq-no-restart"))
        return (f"{name} utilisation {x.text()}; vq without restarts {v.text()}",
                combine(verdict_threshold(x, 0.9), verdict_greater(x, v)))
    return check


FEWER = "NFE(raster) / NFE(order) ≥ 1 / FAR_FEWER and valid(order) ≥ valid(raster) − MODEST"
RELAXED = "acceptance(relaxed) > acceptance(exact) and valid(relaxed) ≥ valid(exact) − SMALL"
BOOK = "utilisation ≥ 0.9 and utilisation > that of vq without restarts"

CLAIMS = [
    Claim("VAR", "next-scale prediction reaches raster's quality at a fraction of the passes",
          "valid(next-scale) ≥ valid(raster) − NEAR and NFE(raster) / NFE(next-scale) ≥ 2", var_claim),
    Claim("MaskGIT", "8 masked steps come near raster quality", "valid(masked, T = 8) ≥ valid(raster) − NEAR",
          maskgit_near_claim),
    Claim("MaskGIT", "more decoding steps help, up to a point",
          "the best later T beats the first T, and the last doubling of T gains < NEAR", maskgit_steps_claim),
    Claim("RandAR", "a random-order model matches raster quality", "valid(random) ≥ valid(raster) − NEAR",
          randar_claim),
    Claim("RandAR", "parallel decoding at about L/4 passes loses little",
          "valid(random-parallel) ≥ valid(random) − NEAR and NFE(random) / NFE(random-parallel) ≥ 2",
          randar_parallel_claim),
    Claim("RandAR", "zero-shot inpainting works (oracle on images with the centre regenerated)",
          "valid(inpainted) ≥ valid(random, unconditional) − NEAR", randar_inpaint_claim),
    Claim("RAR", "annealed random orders in training improve the raster model", "valid(raster + RAR) > valid(raster)",
          rar_claim),
    Claim("SJD", "exact: same quality at ≥ 2× fewer passes, training-free",
          "valid(sjd) ≥ valid(raster) − NEAR and NFE(raster) / NFE(sjd) ≥ 2", sjd_claim),
    Claim("LANTERN", "relaxed acceptance accepts more drafts at a small quality cost (draft model)", RELAXED,
          relaxed_claim("speculative", "lantern")),
    Claim("GSD", "grouped acceptance accepts more at a small quality cost (on SJD)", RELAXED,
          relaxed_claim("sjd", "gsd")),
    Claim("CFG", "guidance improves validity up to a scale, then hurts (U-shape)",
          "an inside scale's validity beats both ends'", cfg_valid_claim),
    Claim("CFG", "guidance improves FID up to a scale, then hurts (U-shape)",
          "an inside scale's FID beats (is below) both ends'", cfg_fid_claim),
    Claim("PAR", "far fewer passes at a modest quality loss", FEWER, fewer_passes_claim("par")),
    Claim("ZipAR", "far fewer passes at a modest quality loss (training-free, raster model)", FEWER,
          fewer_passes_claim("raster", "zipar")),
    Claim("NAR", "far fewer passes at a modest quality loss", FEWER, fewer_passes_claim("neighboring")),
    Claim("NBP", "far fewer passes at a modest quality loss", FEWER, fewer_passes_claim("next-block")),
    Claim("next-cell (xAR, discrete)", "far fewer passes at a modest quality loss", FEWER,
          fewer_passes_claim("next-cell")),
    Claim("HMAR", "better quality than VAR (Markov scales, masked steps inside a scale)",
          "valid(next-scale-markov) > valid(next-scale)", hmar_claim),
    Claim("RQ-Transformer", "depth-stacked codes match raster at the same code budget in fewer passes",
          "valid(depth-stack) ≥ valid(raster) − NEAR and NFE(raster) / NFE(depth-stack) ≥ 2", rq_claim),
    Claim("FSQ", "uses the whole codebook, unlike VQ without restarts", BOOK, codebook_claim("fsq")),
    Claim("LFQ", "uses the whole codebook, unlike VQ without restarts", BOOK, codebook_claim("lfq")),
]


def evaluate_claims(runs: list[dict]) -> list[dict]:
    rows = []
    for c in CLAIMS:
        try:
            figures, v = c.check(runs)
        except Missing as exc:
            figures, v = f"not measured ({exc})", Verdict(UNSURE, "no figures")
        rows.append({"paper": c.paper, "claim": c.claim, "rule": c.rule, "figures": figures,
                     "verdict": v.verdict, "test": v.test})
    return rows


# ---------------------------------------------------------------------------
# Quality against training compute
# ---------------------------------------------------------------------------


def curves(runs: list[dict]) -> dict[str, list[dict]]:
    """Per order label (trained orders and the decoders sharing their models):
    one point per budget — training FLOPs, validity estimate, FID, NFE."""
    out: dict[str, list[dict]] = {}
    for label in dict.fromkeys(r["label"] for r in runs if r["study"].startswith("orders-")):
        sel = [r for r in runs if r["study"].startswith("orders-") and r["label"] == label]
        out[label] = []
        for steps in sorted({r["steps"] for r in sel}):
            at = [r for r in sel if r["steps"] == steps]
            point = {"steps": steps, "flops": at[0]["flops"], "seeds": len(at)}
            for key, fn in (("valid", valid), ("fid", fid), ("nfe", nfe)):
                try:
                    point[key] = fn(at)
                except Missing:
                    point[key] = None
            out[label].append(point)
    return out


def plot_curves(data: dict[str, list[dict]], path: Path) -> bool:
    """``shapes_valid`` (95 % interval as error bars) and FID against training
    FLOPs, one line per order, log-scaled FLOPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not data:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    cmap = plt.get_cmap("tab20")
    for i, (label, pts) in enumerate(sorted(data.items())):
        pts = [p for p in pts if p["flops"]]
        style = {"color": cmap(i % 20), "marker": "o", "ms": 4, "lw": 1.2, "label": label}
        vp = [p for p in pts if p["valid"] is not None]
        if vp:
            x = [p["flops"] for p in vp]
            y = [p["valid"].mean for p in vp]
            err = [[max(0.0, p["valid"].mean - max(0.0, p["valid"].lo)) for p in vp],
                   [max(0.0, min(1.0, p["valid"].hi) - p["valid"].mean) for p in vp]]
            axes[0].errorbar(x, y, yerr=err, capsize=2, **style)
        fp = [p for p in pts if p["fid"] is not None]
        if fp:
            axes[1].plot([p["flops"] for p in fp], [p["fid"].mean for p in fp], **style)
    for ax, ylabel in zip(axes, ("shapes_valid (oracle), 95 % interval", "FID (tokenloom-cnn extractor) ↓")):
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs (train_flops)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.02, 1.02)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("quality against training compute (equal FLOPs across orders at each budget)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------
# docs/claims.md
# ---------------------------------------------------------------------------


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def cuts(b: Budget, steps: dict[str, list[int]]) -> list[str]:
    """What this budget leaves out of the issue's whole study, one line each
    (written into docs/claims.md's header)."""
    out = []
    labels = [o.label for o in orders(b)]
    curve = [x for x in labels if on_curve(b, x)]
    rest = [x for x in labels if not on_curve(b, x)]
    budgets = ", ".join(str(round(f * b.top_steps)) for f in b.fractions)
    if rest:
        why = f" — {CURVES_WHY}" if set(curve) == set(CURVES) else ""
        out.append(f"quality-vs-FLOPs curves ({len(b.fractions)} budgets: {budgets} raster steps) for "
                   f"{', '.join(f'`{x}`' for x in curve)} only{why}; "
                   f"{', '.join(f'`{x}`' for x in rest)} and RAR train at the top budget only (the decoders "
                   "sharing a curve order's model — `zipar`, `random-parallel` — decode it at every budget)")
    else:
        out.append(f"RAR trains at the top budget only ({len(b.fractions)} budgets for every order: {budgets} "
                   "raster steps)")
    if len(b.fractions) > 1:
        out.append("the lower budgets run the first seed only")
    other = top_seeds(b, rest[0]) if rest else b.seeds
    out.append(f"seeds at the top budget: {', '.join(map(str, b.seeds))} for the curve orders, RAR, the decoders, "
               "the sweeps and the codebook study"
               + (f"; {', '.join(map(str, other))} for the other orders — one seed's `valid` keeps its interval "
                  "over samples (Agresti–Caffo over the images; the model's seed-to-seed spread is not in it), "
                  "and its FID has no interval" if tuple(other) != tuple(b.seeds) else ""))
    out.append(f"{b.n_samples} samples per cell (the codebook study: 16)")
    out.append("one training per model: `zipar`, `sjd`, `speculative` (its 1-layer draft apart), the guidance "
               "sweep and the decoder cells decode raster's models; `random-parallel` and the inpainting check "
               "the `random` models; the MaskGIT steps sweep the `masked` models (the cache is keyed by the "
               "model's spec, so each is trained once)")
    recipe = f" (the recipe file trains {b.recipe_steps})" if b.recipe_steps and b.recipe_steps != b.top_steps else ""
    out.append(f"top budget {b.top_steps} raster steps{recipe}; tokenizers fitted {b.tokenizer_steps} steps")
    return out


def budget_table() -> list[str]:
    """The budgets of the script as a Markdown table (docs/claims.md)."""
    lines = [("| budget | top budget (raster steps) | budgets | curve orders | seeds (curves / others) | samples "
              "per cell | tokenizer steps | backbone |"), "|---|---:|---|---|---|---:|---:|---|"]
    for b in BUDGETS.values():
        curve = ", ".join(b.curve_orders) if b.curve_orders else "every order"
        other = b.seeds if b.other_seeds is None else b.other_seeds
        lines.append(f"| `{b.name}` | {b.top_steps} | {', '.join(f'{f:g}' for f in b.fractions)} × top | {curve} | "
                     f"{len(b.seeds)} / {len(other)} | {b.n_samples} | {b.tokenizer_steps} | "
                     f"{b.model[0]}×{b.model[1]} |")
    lines.append("")
    lines.append("(`small` and `full` take the recipe's data, tokenizer table, backbone and sampler; `full` also "
                 "its tokenizer steps.)")
    return lines


def run_conditions(seconds: float, cpu_seconds: float, threads: int, loads: Sequence[float]) -> str:
    """One line: wall and CPU time of the run and the load it ran under."""
    text = f"wall time {seconds / 60:.1f} min, process CPU time {cpu_seconds / 60:.1f} min on {threads} torch thread"
    text += "s" if threads != 1 else ""
    if loads:
        text += (f"; 1-minute load average {sum(loads) / len(loads):.1f} on average over the run "
                 f"({min(loads):.1f}–{max(loads):.1f}, sampled after every study) on {_cores()} cores")
    return text


def claims_markdown(b: Budget, rows: list[dict], data: dict[str, list[dict]], steps: dict[str, list[int]],
                    *, recipe: str, seconds: float, command: str, plot: str | None, fresh: bool = True,
                    conditions: str = "", estimates: dict[str, str] | None = None) -> str:
    counts = {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# The seeds' claims, measured", ""]
    lines += [(f"**Produced by the `{b.name}` budget** of `bench/claims.py` (`{command}`), {when}, "
              f"{seconds / 60:.1f} min on {platform.machine()} with {_cores()} cores "
              + ("from scratch." if fresh else "(this invocation, reusing the finished stages of an earlier one)."))]
    if conditions:
        lines += ["", f"Run conditions: {conditions}."]
    if b.name == "small":
        lines += ["", ("> **Small budget.** The full budget's plan (the same orders, seeds, sweeps and claims) at "
                  f"{b.top_steps} raster steps against full's {BUDGETS['full'].top_steps}, shorter tokenizer fits "
                  "and fewer samples: a run that fits in under an hour of the loaded shared machine. Quality is "
                  "lower than the full budget's, so verdicts against the FLOOR are more often *inconclusive*; "
                  "`make claims` runs the full budget.")]
    if b.name == "smoke":
        lines += ["", ("> **Smoke budget: these verdicts say nothing about the methods.** The smoke budget trains "
                  "tiny tokenizers and backbones for a few dozen steps and scores 16 samples per cell, only to "
                  "exercise every claim's code path; its intervals are wide and most verdicts are *inconclusive* "
                  "by design. Run `make claims` (the full budget) for the study; "
                  "`bench/claims.py --budget full --estimate` measures a few steps of every stage and prints how "
                  "long it would take on the machine at hand.")]
    lines += ["", (f"Verdicts: {counts[HOLDS]} hold, {counts[FAILS]} do not hold, {counts[UNSURE]} inconclusive. "
              "Every verdict below is computed by the script from the stated test; none is written by hand "
              "(this file is generated — edit `bench/claims.py`, not this file)."), ""]
    lines += ["## Setup", "",
              (f"- recipe: {recipe}; `shapes` {b.size} px, {b.n} training and {b.n_holdout} held-out images; "
              f"`vq` {b.codebook} codes, downsample {b.downsample} ({grid_side(b)}×{grid_side(b)} codes), "
              f"tokenizers fitted {b.tokenizer_steps} steps; backbone {b.model[0]} layer{'s' if b.model[0] > 1 else ''} "
               f"× width {b.model[1]}, "
              f"{b.model[2]} heads"
              + "".join(f", {k} = {json.dumps(v)}" for k, v in b.model_options)
              + ("" if any(k == "cond" for k, _ in b.model_options) else ", cond = \"prefix\" (the default)")
              + f"; batch {b.batch_size}, lr {b.lr:g}, warm-up {b.warmup} steps (one value for every "
               "model, so the sweeps reuse the orders' models); sampler chain "
              f"{' → '.join(t['name'] + ' ' + str(t.get('scale', t.get('k'))) for t in chain(b))}; {b.n_samples} samples per cell; seeds as in the cuts below;"),
              f"- training budgets: {', '.join(str(round(f * b.top_steps)) for f in b.fractions)} `raster` steps; "
              "every order gets the steps that spend the same training FLOPs (the trainer's count, "
              "tokens × (6·N + 12·n_layer·d·T)) at its own sequence length and size: "
              + "; ".join(f"`{k}` {'/'.join(map(str, v))}" for k, v in steps.items()) + ";",
              ("- figures: `valid` is the `shapes-oracle` metric's `shapes_valid` (images passing every rule of "
              "the data set) as mean ± seed standard deviation, then its 95 % interval: Agresti–Caffo over the "
              "pooled samples, or the seeds' spread when larger; FID (offline `tokenloom-cnn` extractor), NFE "
              "and codebook utilisation as mean ± sd with a Student-t interval over seeds; acceptance rates as a "
              "proportion over images (conservative)"
              + ("; FID from fewer than 65 images (the extractor's feature dimension + 1) is unreliable: a singular "
                 "covariance" if b.n_samples < 65 else "") + ";"),
              (f"- margins: NEAR = {NEAR} (\"matches\", \"near\", \"loses little\", \"same quality\"), "
              f"MODEST = {MODEST}, SMALL = {SMALL}, \"far fewer passes\" = at most {FAR_FEWER:g}× raster's NFE; "
               "a \"keeps up with the reference\" test is inconclusive when the reference's validity is below "
               f"FLOOR = {FLOOR} (orders that all fail every image would \"match\" vacuously);"),
              ("- verdicts: *holds* when the 95 % interval of the tested difference clears the stated bound, "
              "*does not hold* when it lies on the wrong side, *inconclusive* when it straddles it (the "
              "rules are `verdict_*` in `bench/claims.py`, tested in `tests/test_claims.py`)."), ""]
    lines += ["## What this budget cuts", "", ("Every cut of this budget against the issue's whole study "
              "(all orders at every budget, more seeds), written by the script:"), ""]
    lines += [f"- {c};" for c in cuts(b, steps)]
    lines += ["", "The budgets:", ""] + budget_table() + [""]
    for name, text in (estimates or {}).items():
        lines += [f"- `bench/claims.py --budget {name} --estimate`, measured {text}."]
    if estimates:
        lines += [""]
    lines += ["## Claims", "", "| paper | claim | test | tokenloom figures | interval test | verdict |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(x) for x in (r["paper"], r["claim"], r["rule"], r["figures"], r["test"],
                                                          f"**{r['verdict']}**")) + " |")
    lines += ["", "## Quality against training compute", "",
              ("Each order at each budget (equal training FLOPs across orders at a budget); `zipar` decodes the "
              "`raster` model and `random-parallel` the `random` model, `raster-rar` trains raster with RAR's "
              "annealed orders at raster's steps."), ""]
    if plot:
        lines += [f"![quality against training FLOPs]({plot})", ""]
    lines += ["| order | steps | training FLOPs | seeds | valid | FID | NFE |", "|---|---:|---:|---:|---|---|---:|"]
    for label in sorted(data):
        for p in data[label]:
            lines.append(f"| `{label}` | {p['steps']} | {p['flops']:.3g} | {p['seeds']} | "
                         f"{p['valid'].text() if p['valid'] else '—'} | {p['fid'].text(1) if p['fid'] else '—'} | "
                         f"{p['nfe'].mean:.1f} |" if p["flops"] and p["nfe"] else
                         f"| `{label}` | {p['steps']} | — | {p['seeds']} | — | — | — |")
    lines += ["", ("Reports of every grid (one row per cell, with sample grids) are under `<out>/reports/`; the grid "
              "files under `<out>/grids/`."), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# docs/orders.md: its measured tables, from the same run
# ---------------------------------------------------------------------------

ORDERS_BEGIN, ORDERS_END = "<!-- claims: begin -->", "<!-- claims: end -->"

#: NFE of each order on an h×w grid, as docs/orders.md's first table states it
NFE_FORMULA = {"raster": "L = h·w", "raster-rar": "L", "zipar": "2w + (h − 2)·window", "random": "L",
               "random-parallel": "steps (≈ L/4)", "masked": "T (steps)", "next-block": "h / rows",
               "next-cell": "(h/k)·(w/k)", "neighboring": "h + w − 1", "par": "n + (L − n)/n",
               "next-scale": "number of scales", "next-scale-markov": "Σ over scales of its masked steps",
               "depth-stack": "h·w (+ D depth-head steps each)", "next-frequency": "number of bands"}


#: the decoders of the orders grids that decode another order's model
SHARED = {"zipar": "raster", "random-parallel": "random"}


def layouts(b: Budget) -> dict[str, tuple[int, int]]:
    """Sequence length and vocabulary of each tokenizer of the study (built, not fitted)."""
    from tokenloom.config import build_component
    from tokenloom.registry import get_registry

    registry = get_registry()
    out = {}
    for label, table in tokenizers(b).items():
        opts = {k: v for k, v in table.items() if k != "name"}
        tok = build_component(registry, "tokenizer", table["name"], {**opts, "image_shape": (3, b.size, b.size)},
                              path="tokenizer")
        out[label] = (int(tok.layout.length), int(tok.vocab_size))
    return out


def order_rows(runs: list[dict], b: Budget, lay: dict[str, tuple[int, int]]) -> list[dict]:
    """One row per label of the orders grids at its top budget (the order, then the
    decoders and variants sharing its grid), with the figures docs/orders.md shows."""
    raster_nfe = None
    rows = []
    for o in orders(b):
        for label in [o.label] + [k for k, _ in o.extra]:
            try:
                at = top(runs, o.label, label)
            except Missing:
                continue
            row: dict[str, Any] = {"label": label, "tokenizer": o.tokenizer, "L": lay.get(o.tokenizer, (None,))[0],
                                   "steps": at[0]["steps"], "seeds": len(at),
                                   "shared": SHARED.get(label),
                                   "samples": next((r["samples"] for r in sorted(at, key=lambda r: r["seed"])
                                                    if r.get("samples")), None)}
            for key, fn in (("valid", valid), ("fid", fid), ("nfe", nfe)):
                try:
                    row[key] = fn(at)
                except Missing:
                    row[key] = None
            for key in ("shapes_class_ok", "shapes_colour_ok", "shapes_count_ok", "nll_bits_per_image",
                        "seconds_per_image"):
                xs = [r["metrics"].get(key) for r in at]
                xs = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
                row[key] = math.fsum(xs) / len(xs) if xs else None
            if label == "raster" and row["nfe"] is not None:
                raster_nfe = row["nfe"].mean
            rows.append(row)
    for row in rows:
        row["nfe_ratio"] = row["nfe"].mean / raster_nfe if raster_nfe and row["nfe"] else None
    return rows


def tokenizer_ceilings(b: Budget, out: Path, labels: Sequence[str], *, only_cached: bool = False) -> dict[str, dict]:
    """Each tokenizer's own held-out reconstructions (decode ∘ encode of the
    held-out images; the fitted tokenizer of the first seed, from the run's
    cache) judged by the ``shapes-oracle`` rules: no order can sample better
    images than its tokenizer decodes. ``only_cached``: skip the tokenizers
    not fitted yet (a partial report fits nothing)."""
    import torch

    from tokenloom.config import build_component, parse_config
    from tokenloom.interfaces import MetricContext
    from tokenloom.pipeline import data_key, fit_tokenizer, load_data, tokenizer_key
    from tokenloom.registry import get_registry

    registry = get_registry()
    metric = build_component(registry, "metric", "shapes-oracle", {}, path="metrics.shapes-oracle")
    toks = tokenizers(b)
    result = {}
    for name in labels:
        raw = base_doc(b, steps=1)
        raw["tokenizer"] = toks[name]
        cfg = parse_config(raw, registry=registry, source="bench/claims.py (tokenizer check)")
        if only_cached and name != "frequency" and not (
                out / "cache" / f"tokenizer-{tokenizer_key(cfg, data_key(cfg))}.safetensors").is_file():
            continue
        train_set, holdout = load_data(cfg)
        tok, _, _ = fit_tokenizer(cfg, train_set.images, out / "cache", registry=registry,
                                  device=torch.device("cpu"), progress=False, data_id=data_key(cfg))
        with torch.no_grad():
            rec = torch.cat([tok.decode(tok.encode(holdout.images[i: i + 256]))
                             for i in range(0, len(holdout), 256)])
        m = metric.compute(MetricContext(generated=rec, generated_labels=holdout.labels.long(),
                                         data=holdout)).values
        mse = float(((rec - holdout.images) ** 2).mean())
        result[name] = {"options": {k: v for k, v in toks[name].items() if k != "name"}, "kind": toks[name]["name"],
                        "L": tok.layout.length, "vocab": tok.vocab_size, "n": len(holdout),
                        "psnr_db": 10 * math.log10(4.0 / mse) if mse > 0 else math.inf,
                        "shapes_valid": m["shapes_valid"], "shapes_colour_ok": m["shapes_colour_ok"],
                        "shapes_count_ok": m["shapes_count_ok"]}
    return result


def orders_markdown(rows: list[dict], ceilings: dict[str, dict], *, header: str) -> str:
    """The measured part of docs/orders.md: one row per order at the top budget and the
    tokenizers' own reconstructions judged by the oracle."""
    def f(v: Any, fmt: str) -> str:
        return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    lines = [header, "",
             ("| order | tokenizer (L) | train steps (same FLOPs) | seeds | NFE | formula | NFE ÷ raster | "
              "seconds / image | held-out NLL (bits / image) | oracle-valid | class-ok | palette-clean | count-ok | "
              "FID | samples |"),
             "|---|---|---:|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---|---|"]
    for r in rows:
        steps = f"{r['steps']}" + (f" (the `{r['shared']}` model)" if r.get("shared") else "")
        pic = f"![{r['label']}](orders/{r['label']}.png)" if r.get("samples") else "—"
        lines.append(
            f"| `{r['label']}` | {r['tokenizer']} ({f(r['L'], 'd')}) | {steps} | {r['seeds']} | "
            f"{f(r['nfe'].mean if r['nfe'] else None, '.1f')} | {NFE_FORMULA.get(r['label'], '')} | "
            f"{f(r['nfe_ratio'], '.3f')} | {f(r['seconds_per_image'], '.4f')} | {f(r['nll_bits_per_image'], '.1f')} | "
            f"{r['valid'].text() if r['valid'] else '—'} | {f(r['shapes_class_ok'], '.2f')} | "
            f"{f(r['shapes_colour_ok'], '.2f')} | {f(r['shapes_count_ok'], '.2f')} | "
            f"{r['fid'].text(1) if r['fid'] else '—'} | {pic} |")
    if ceilings:
        n = next(iter(ceilings.values()))["n"]
        lines += ["", (f"The tokenizers' own reconstructions of the {n} held-out images (first seed's fit), judged "
                       "by the same oracle (no order can do better than its tokenizer decodes):"), "",
                  "| tokenizer | options | L | vocabulary | PSNR (dB) | oracle-valid | palette-clean | count-ok |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for name, c in ceilings.items():
            opts = ", ".join(f"{k} {v}" for k, v in c["options"].items())
            lines.append(f"| {name} | {c['kind']}: {opts} | {c['L']} | {c['vocab']} | {f(c['psnr_db'], '.1f')} | "
                         f"{f(c['shapes_valid'], '.2f')} | {f(c['shapes_colour_ok'], '.2f')} | "
                         f"{f(c['shapes_count_ok'], '.2f')} |")
    return "\n".join(lines)


def write_marked(path: Path, text: str, begin: str = ORDERS_BEGIN, end: str = ORDERS_END) -> None:
    """Replace what lies between the ``begin`` and ``end`` markers of ``path`` with ``text``
    (the rest of the file is hand-written and kept); a file without both markers is an error."""
    doc = path.read_text(encoding="utf-8")
    if begin not in doc or end not in doc or doc.index(begin) > doc.index(end):
        raise ValueError(f"{path}: expected the markers {begin} … {end} around the generated tables")
    head, rest = doc.split(begin, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(f"{head}{begin}\n{text}\n{end}{tail}", encoding="utf-8")


def _cores() -> int:
    import os

    return os.cpu_count() or 1


# ---------------------------------------------------------------------------
# How long a budget takes (measured now, extrapolated over the plan)
# ---------------------------------------------------------------------------


class _Clock:
    """Wall and CPU seconds of everything timed through it (the load factor: wall ÷ CPU, one thread)."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def timed(self, fn: Any, repeats: int) -> tuple[float, float]:
        """(wall, CPU) seconds per call of ``fn``, after one warm-up call."""
        fn()
        t, c = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            fn()
        wall, cpu = (time.perf_counter() - t) / repeats, (time.process_time() - c) / repeats
        self.wall += wall
        self.cpu += cpu
        return wall, cpu


#: the order whose model (and so whose training step) a decoder uses
TRAINER = {"zipar": "raster", "random-parallel": "random", "sjd": "raster", "speculative": "raster"}


def study_plan(b: Budget, steps: dict[str, list[int]]) -> dict[str, Any]:
    """What the study computes, read from its grids as ``tokenloom ablate`` plans
    them (the cache keys dedupe exactly as the run will): ``models`` {key:
    (the order whose training step it takes, steps)} of the target models,
    ``aux`` the auxiliary models (speculative drafts), ``tokenizers`` {key:
    tokenizer label}, and ``cells`` [(order, images, cost factor)] — every
    generation cell (guidance doubles a pass; MaskGIT's cost scales with its
    steps, relative to 8)."""
    from tokenloom.ablation import plan_grid

    docs = [g.doc for g in order_grids(b, steps) + top_grids(b, steps)]
    docs += [inpainting_doc(b, steps, s) for s in top_seeds(b, "random")]
    models: dict[str, tuple[str, int]] = {}
    aux: set[str] = set()
    toks: dict[str, str] = {}
    cells: list[tuple[str, int, float]] = []
    for doc in docs:
        for pc in plan_grid(doc).cells:
            raw = pc.cell.config
            name = raw["generator"]["name"]
            trainer = TRAINER.get(name, name)
            models.setdefault(pc.models[0], (trainer, int(raw["train"]["steps"])))
            aux.update(pc.models[1:])
            toks.setdefault(pc.tokenizer, tokenizer_label(raw["tokenizer"]))
            factor = 2.0 if any(t["name"] == "cfg" for t in raw.get("sampler", [])) else 1.0
            if name == "masked":
                factor *= raw["generator"].get("steps", 8) / 8
            cells.append((trainer, int(raw["metrics"]["n_samples"]), factor))
    return {"models": models, "aux": aux, "tokenizers": toks, "cells": cells}


def estimate_seconds(b: Budget, steps: dict[str, list[int]], *, repeats: int = 3) -> dict[str, float]:
    """The budget's time on this machine: seconds per training step of every
    order (fresh weights, random codes), per tokenizer-fitting step (and each
    fit's set-up) and per generated image, measured on one thread over a few
    repeats and multiplied by what :func:`study_plan` says the run computes.

    Two figures: ``total`` (wall seconds now, on a machine maybe shared) and
    ``idle`` (CPU seconds of the same work: what one thread takes when nothing
    else runs — the run's default two threads on an idle machine are no
    slower); ``load_factor`` is their ratio over everything timed. Excludes
    the one-off FID extractor, the data sets, the metrics, the tokenizer
    reconstruction check and the speculative drafts' training (a minute or two
    in all), and assumes adaptive decoders (SJD, speculative) cost what raster
    does per image."""
    import os

    import torch

    from tokenloom.config import build_component, parse_config
    from tokenloom.interfaces import SamplerContext
    from tokenloom.model import InstrumentedModel, build_model
    from tokenloom.registry import get_registry
    from tokenloom.rng import RowRNG
    from tokenloom.sampling import build_chain
    from tokenloom.train import configure_optimizer, make_batch, train_step

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    clock = _Clock()
    registry = get_registry()
    toks = tokenizers(b)
    plan = study_plan(b, steps)
    per_step: dict[str, tuple[float, float]] = {}
    per_image: dict[str, tuple[float, float]] = {}
    for o in orders(b):
        raw = base_doc(b, steps=max(steps[o.label]))
        raw["tokenizer"], raw["generator"] = toks[o.tokenizer], dict(o.table)
        cfg = parse_config(raw, registry=registry, source="bench/claims.py (estimate)")
        tok = build_component(registry, "tokenizer", cfg.tokenizer.name,
                              {**cfg.tokenizer.options, "image_shape": (3, b.size, b.size)}, path="tokenizer")
        gen = build_component(registry, "generator", cfg.generator.name,
                              {**cfg.generator.options, "tokenizer": tok}, path="generator")
        model = build_model(gen.model_spec(), cfg.model, n_classes=N_CLASSES, seed=0)
        opt = configure_optimizer(model, cfg.train)
        g = torch.Generator().manual_seed(0)
        codes = torch.randint(0, tok.vocab_size, (4 * b.batch_size, tok.layout.length), generator=g)
        labels = torch.randint(0, N_CLASSES, (4 * b.batch_size,), generator=g)
        idx = torch.arange(b.batch_size)

        def step(gen=gen, codes=codes, labels=labels, idx=idx, model=model, opt=opt) -> None:
            batch = make_batch(gen, codes, labels, idx, seed=0, step=1, n_steps=10, label_dropout=0.1,
                               null_class=N_CLASSES)
            train_step(model, opt, batch, lr=1e-4, grad_clip=1.0)

        per_step[o.label] = clock.timed(step, repeats)
        model.eval()
        wrapped = InstrumentedModel(model)
        chain_ = build_chain(cfg.sampler, registry=registry)
        emb = wrapped.token_embeddings()
        chain_.bind(SamplerContext(vocab_size=tok.vocab_size, code_embeddings=tok.code_embeddings().detach(),
                                   token_embeddings=None if emb is None else emb.detach()))
        lab = torch.arange(16) % N_CLASSES

        def generate(gen=gen, wrapped=wrapped, chain_=chain_, lab=lab) -> None:
            with torch.inference_mode():
                gen.generate(wrapped, chain_, lab, rng=RowRNG(0, torch.arange(16)))

        w, c = clock.timed(generate, 1)
        per_image[o.label] = (w / 16, c / 16)
    per_fit: dict[str, tuple[float, float, float, float]] = {}  # wall/CPU per step, wall/CPU set-up
    images = torch.rand(256, 3, b.size, b.size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for name in dict.fromkeys(plan["tokenizers"].values()):
        if name == "frequency":  # training-free
            continue
        table = {k: v for k, v in toks[name].items() if k not in ("name", "steps")}

        def fit(n: int, name=name, table=table) -> None:
            tok = build_component(registry, "tokenizer", toks[name]["name"], {**table, "steps": n,
                                  "image_shape": (3, b.size, b.size)}, path="tokenizer")
            tok.fit(images, steps=n, progress=False)

        w2, c2 = clock.timed(lambda: fit(2), 1)
        wn, cn = clock.timed(lambda: fit(2 + 2 * repeats), 1)
        ws, cs = max(0.0, (wn - w2) / (2 * repeats)), max(0.0, (cn - c2) / (2 * repeats))
        per_fit[name] = (ws, cs, max(0.0, w2 - 2 * ws), max(0.0, c2 - 2 * cs))
    torch.set_num_threads(threads)
    out: dict[str, float] = {}
    for which, k in (("", 0), ("idle_", 1)):
        out[which + "train"] = sum(per_step[o][k] * n for o, n in plan["models"].values())
        out[which + "tokenizers"] = sum(per_fit[t][k] * b.tokenizer_steps + per_fit[t][k + 2]
                                        for t in plan["tokenizers"].values() if t in per_fit)
        out[which + "generate"] = sum(per_image[o][k] * n * f for o, n, f in plan["cells"])
        out[which + "total"] = out[which + "train"] + out[which + "tokenizers"] + out[which + "generate"]
    out["load_factor"] = clock.wall / clock.cpu if clock.cpu > 0 else math.nan
    out["step:raster"] = per_step["raster"][0]
    out["idle_step:raster"] = per_step["raster"][1]
    out["models"] = len(plan["models"])
    out["model_steps"] = sum(n for _, n in plan["models"].values())
    out["raster_equivalent_steps"] = sum(per_step[o][1] * n for o, n in plan["models"].values()) / per_step["raster"][1]
    out["fits"] = sum(t != "frequency" for t in plan["tokenizers"].values())
    out["cells"] = len(plan["cells"])
    out["images"] = sum(n for _, n, _ in plan["cells"])
    out["load_average"] = os.getloadavg()[0]
    return out


def estimate_text(b: Budget, est: dict[str, float]) -> str:
    """The estimate in one paragraph (printed by ``--estimate``, and quoted in docs/claims.md)."""
    return (f"the `{b.name}` budget from scratch: {est['idle_total'] / 60:.0f} min on an idle machine (CPU time of "
            f"one thread: backbones {est['idle_train'] / 60:.0f}, tokenizers {est['idle_tokenizers'] / 60:.0f}, "
            f"generation {est['idle_generate'] / 60:.0f}), {est['total'] / 60:.0f} min of wall time at the load "
            f"measured (load factor {est['load_factor']:.2f} = wall ÷ CPU seconds of the timed steps on one "
            f"thread; load average {est['load_average']:.1f} on {_cores()} cores); {int(est['models'])} backbones "
            f"({int(est['model_steps'])} steps, worth {est['raster_equivalent_steps']:.0f} raster steps), "
            f"{int(est['fits'])} tokenizer fits, {int(est['cells'])} generation cells ({int(est['images'])} images); "
            f"one raster step {est['idle_step:raster']:.3f} CPU-s; excludes metrics, the FID extractor, the "
            f"tokenizer check and the speculative drafts (a minute or two)")


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    ap.add_argument("--out", default=None, help="output directory (default runs/claims-<budget>)")
    ap.add_argument("--docs", default=str(ROOT / "docs"), help="where claims.md and claims/ are written")
    ap.add_argument("--recipe", default=str(RECIPE), help="recipe TOML (used when it exists; not for smoke)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--write-grids", metavar="DIR", default=None,
                    help="write the budget's grid files into DIR (e.g. examples/claims) and stop")
    ap.add_argument("--estimate", action="store_true",
                    help="measure a few steps of every stage now and print how long the budget would take")
    ap.add_argument("--partial", action="store_true",
                    help="write the docs from the cells finished so far under --out (nothing trained or "
                         "generated; a claim missing a figure is 'not measured'), labelled as partial")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    budget, recipe = apply_recipe(BUDGETS[args.budget], Path(args.recipe))
    out = Path(args.out or ROOT / "runs" / f"claims-{budget.name}")
    t0 = time.perf_counter()
    print(f"claims: budget {budget.name}, recipe {recipe}, output {out}", flush=True)
    per_step = {o.label: flops_per_step(budget, o) for o in orders(budget)}
    steps = steps_at_budgets(budget, per_step)
    budget = with_study_warmup(budget, steps)
    print("steps at equal FLOPs: " + "; ".join(f"{k} {v}" for k, v in steps.items()), flush=True)
    if args.write_grids:
        target = Path(args.write_grids)
        target.mkdir(parents=True, exist_ok=True)
        for study in order_grids(budget, steps) + top_grids(budget, steps):
            head = (f"{study.comment}\n\nWritten by `bench/claims.py --budget {budget.name} --write-grids {target}` "
                    f"(recipe: {recipe}); bench/claims.py runs these\ngrids into one directory, so every cell "
                    f"shares one cache:\n  tokenloom ablate {target / (study.name + '.toml')} --out "
                    f"runs/claims-{budget.name}\n(RandAR's inpainting check is a run option, region = center, "
                    "not a grid: see bench/claims.py.)")
            (target / f"{study.name}.toml").write_text(to_toml(study.doc, head), encoding="utf-8")
        print(f"wrote {len(order_grids(budget, steps)) + 4} grid files to {target}")
        return 0
    if args.estimate:
        est = estimate_seconds(budget, steps)
        print("estimate: " + estimate_text(budget, est))
        (out / "estimate.json").parent.mkdir(parents=True, exist_ok=True)
        (out / "estimate.json").write_text(json.dumps(est, indent=1), encoding="utf-8")
        return 0
    fresh = not (out / "cells").exists()
    out.mkdir(parents=True, exist_ok=True)
    import os

    cpu0, loads = time.process_time(), [os.getloadavg()[0]]
    runs: list[dict] = []
    timings: dict[str, float] = {}
    partial = None
    if args.partial:
        done = planned = 0
        for study in order_grids(budget, steps) + top_grids(budget, steps):
            got, n = finished_runs(study, out)
            runs += got
            done, planned = done + len(got), planned + n
        partial = f"{done} of the {planned} grid cells finished (the inpainting check not run)"
        print(f"partial: {partial}", flush=True)
    else:
        for study in order_grids(budget, steps) + top_grids(budget, steps):
            ts = time.perf_counter()
            runs += run_study(study, out, progress=not args.quiet)
            timings[study.name] = time.perf_counter() - ts
            loads.append(os.getloadavg()[0])
        ts = time.perf_counter()
        runs += run_inpainting(budget, steps, out, progress=not args.quiet)
        timings["inpainting"] = time.perf_counter() - ts
    ts = time.perf_counter()
    ceilings = tokenizer_ceilings(budget, out, list(tokenizers(budget)), only_cached=args.partial)
    timings["tokenizer check"] = time.perf_counter() - ts
    loads.append(os.getloadavg()[0])

    rows = evaluate_claims(runs)
    data = curves(runs)
    docs = Path(args.docs)
    plot_rel = None
    if plot_curves(data, out / "plots" / "quality-vs-train-flops.png"):
        (docs / "claims").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "plots" / "quality-vs-train-flops.png", docs / "claims" / "quality-vs-train-flops.png")
        plot_rel = "claims/quality-vs-train-flops.png"
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    conditions = run_conditions(seconds, cpu, torch.get_num_threads(), loads)
    if partial:
        conditions = (f"**PARTIAL REPORT** (`--partial`): {partial}, read from {out} — claims whose figures are "
                      "missing say 'not measured'; the wall time below is the report's, not the study's; " + conditions)
    command = " ".join(["bench/claims.py"] + (argv if argv is not None else sys.argv[1:]))
    estimates = {}
    for name, other in BUDGETS.items():
        path = ROOT / "runs" / f"claims-{name}" / "estimate.json"
        if path.is_file():
            estimates[name] = estimate_text(other, json.loads(path.read_text(encoding="utf-8")))
    md = claims_markdown(budget, rows, data, steps, recipe=recipe, seconds=seconds, command=command, plot=plot_rel,
                         fresh=fresh, conditions=conditions, estimates=estimates)
    o_rows = order_rows(runs, budget, layouts(budget))
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"**Written by the `{budget.name}` budget of `bench/claims.py`** (`{command}`, {when}; {conditions}) "
              "from the same run as [claims.md](claims.md), whose Setup and cuts sections give every setting: "
              "each order at the study's top training budget, equal training FLOPs across orders; `valid` as "
              "there (mean ± seed sd, 95 % interval, seeds), FID (offline extractor) mean ± sd; seconds per "
              "image is the pipeline's single measurement on the shared machine (noisy). The quality-vs-FLOPs "
              "curves are in claims.md.")
    if budget.name == "smoke":
        header += " **Smoke budget: tiny models, the figures say nothing about the methods.**"
    o_md = orders_markdown(o_rows, ceilings, header=header)
    # every figure computed: now write the docs, claims.md and orders.md together
    (docs / "claims.md").write_text(md, encoding="utf-8")
    (docs / "orders").mkdir(parents=True, exist_ok=True)
    for r in o_rows:
        if r.get("samples") and (out / r["samples"]).is_file():
            shutil.copyfile(out / r["samples"], docs / "orders" / f"{r['label']}.png")
    if (docs / "orders.md").is_file():
        write_marked(docs / "orders.md", o_md)
    else:
        print(f"({docs / 'orders.md'} does not exist: its tables not written)", file=sys.stderr)
    record = {"budget": asdict(budget), "recipe": recipe, "seconds": seconds, "cpu_seconds": cpu, "loads": loads,
              "timings": timings, "steps": steps, "claims": rows, "tokenizer_ceilings": ceilings, "runs": runs}
    (out / "claims.json").write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
    width = max(len(r["paper"]) for r in rows)
    for r in rows:
        print(f"{r['paper']:<{width}}  {r['verdict']:<14} {r['claim']}")
    print(f"claims: {docs / 'claims.md'}, {docs / 'orders.md'} ({seconds / 60:.1f} min; per study: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
