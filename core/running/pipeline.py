"""The end-to-end run: data → tokenizer → codes → model → samples → metrics → report.

:func:`run` executes one :class:`~tokenloom.config.RunConfig`. Every stage's
artifact is cached under ``<out>/cache/`` by a hash of exactly what it
depends on, so a second run that changes only the sampler chain reuses the
tokenizer and the model, and a run killed at any point resumes:

=============  ==================================================================
stage          cache key
=============  ==================================================================
tokenizer      data config, tokenizer table, image shape, seed
codes          tokenizer weights (content hash), data config, seed
model          tokenizer hash × ``model_spec()`` (train order, length, vocab, ...)
               × ``[model]`` × ``[train]`` × classes × seed; training checkpoints
               resume mid-run
samples        model hash × generator table × sampler chain × n_samples × region
=============  ==================================================================

Outputs (DESIGN.md, "Outputs of a run directory"): ``results.json`` (runs
merged by id, so several configs can share one directory and one table),
``results.md`` and ``samples/<run-id>.png``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import torch

from ..backbone import dist
from ..backbone.train import heldout_nll
from ..backbone.train import train as train_backbone
from ..contract.checkpoint import (
    load_component,
    load_tensors,
    save_tensors,
    save_tokenizer,
    write_json,
    write_text,
)
from ..contract.config import RunConfig, build_component, config_to_dict
from ..contract.errors import CheckpointError, ConfigError
from ..contract.interfaces import Known, MetricContext, SamplerContext, TokenLayout
from .pipeline_check import check_composition, image_shape_of

#: Images generated per forward batch. Fixed, so image i sees the same
#: floating-point computation whatever ``n_samples`` or the process count.
MICRO_BATCH = 16
#: Regions ``known_region`` can regenerate (the rest of the image is kept).
REGIONS = ("center", "border", "left", "right", "top", "bottom")


def stable_hash(obj: Any, n: int = 16) -> str:
    """A short SHA-256 of the canonical JSON of ``obj``."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def component_key(c: Any) -> dict:
    """A component's identity for cache keys: its name and *full* structured
    config (defaults included, so a plugin changing a default invalidates
    the cache) — the raw table when the config is not an attrs instance."""
    cfg = c.config
    if cfg is not None and attrs.has(type(cfg)):
        return {"name": c.name, "config": attrs.asdict(cfg)}
    return c.table()


def resolve_device(name: str) -> torch.device:
    from ..backbone.dist import local_device

    if local_device() is not None and name in ("auto", "cuda"):  # torchrun on GPUs: this rank's GPU
        return local_device()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError([f"device: {exc}"]) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError([f"device: {name!r} asked for, but CUDA is not available (use 'auto' or 'cpu')"])
    return dev


class StageTimer:
    """Wall seconds per pipeline stage: ``lap(name)`` books the time since
    the previous lap to ``name`` (a run's ``record["timings"]``: data,
    tokenizer, encode, train, auxiliary, generate, nll, decode,
    ``metric:<name>`` and report; a cached stage shows its load time)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._t
        self._t = now


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[tokenloom] {msg}", file=sys.stderr, flush=True)


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


def _cached(path: Path) -> bool:
    """:func:`cache_ok` decided by rank 0 and agreed by every rank."""
    return bool(dist.agree(cache_ok(path) if dist.is_main() else None))


# ---------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------


def load_data(cfg: RunConfig) -> tuple[Any, Any]:
    """The training and held-out :class:`~tokenloom.data.ImageSet`."""
    from ..blocks.data import load_dataset

    return load_dataset(cfg.data, split="train", seed=cfg.seed), load_dataset(cfg.data, split="holdout", seed=cfg.seed)


def data_key(cfg: RunConfig) -> str:
    """The ``data_id`` of caches when the run loads ``cfg.data`` itself."""
    return stable_hash(attrs.asdict(cfg.data))


def tokenizer_key(cfg: RunConfig, data_id: str) -> str:
    """The tokenizer's cache key (``cache/tokenizer-<key>.safetensors``):
    known before fitting, so an ablation can plan which tokenizers it fits."""
    return stable_hash({"tokenizer": component_key(cfg.tokenizer), "data": data_id, "seed": cfg.seed,
                        "image_shape": image_shape_of(cfg)})


def fit_tokenizer(cfg: RunConfig, images: torch.Tensor, cache: Path, *, registry: Any, device: torch.device,
                  progress: bool, data_id: str) -> tuple[Any, str, bool]:
    """The fitted tokenizer, its identity (a hash of its config key and
    weights) and whether it came from the cache."""
    shape = image_shape_of(cfg)
    key = tokenizer_key(cfg, data_id)
    path = cache / f"tokenizer-{key}.safetensors"
    if cache_ok(path):
        tok = load_component(path, image_shape=shape)
        _, meta = load_tensors(path)
        return tok.to(device).eval(), stable_hash({"key": key, "weights": meta["sha256"]}), True
    tok = build_component(registry, "tokenizer", cfg.tokenizer.name, {**cfg.tokenizer.options, "image_shape": shape},
                          path="tokenizer").to(device)
    _say(progress, f"fitting tokenizer '{cfg.tokenizer.name}' on {images.shape[0]} images")
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        tok.train()
        tok.fit(images.to(device), progress=progress)
    tok.eval()
    digest = save_tokenizer(path, tok, name=cfg.tokenizer.name, options=dict(cfg.tokenizer.options))
    return tok, stable_hash({"key": key, "weights": digest}), False


def encode_all(tok: Any, tok_hash: str, sets: dict[str, Any], cache: Path, *, key_extra: Any,
               device: torch.device, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Codes of every split (``{split: LongTensor[N, L]}``), encoded once and cached."""
    key = stable_hash({"tokenizer": tok_hash, "data": key_extra})
    path = cache / f"codes-{key}.safetensors"
    if cache_ok(path):
        tensors, _ = load_tensors(path)
        return tensors
    out = {}
    with torch.no_grad():
        for split, data in sets.items():
            parts = [tok.encode(data.images[i : i + batch_size].to(device)).cpu()
                     for i in range(0, len(data), batch_size)]
            out[split] = torch.cat(parts) if parts else torch.zeros(0, tok.layout.length, dtype=torch.long)
    save_tensors(path, out, {"tokenizer_sha256": tok_hash})
    return out


def model_key(cfg: RunConfig, spec: Any, tok_hash: str, n_classes: int, data_id: str) -> str:
    return stable_hash({"tokenizer": tok_hash, "spec": spec.key(), "model": attrs.asdict(cfg.model),
                        "train": attrs.asdict(cfg.train), "n_classes": n_classes, "data": data_id, "seed": cfg.seed})


def train_or_load(cfg: RunConfig, generator: Any, codes: torch.Tensor, labels: torch.Tensor, n_classes: int,
                  tok_hash: str, cache: Path, *, device: torch.device, progress: bool,
                  data_id: str) -> tuple[Any, dict, str]:
    """The trained backbone (cached by :func:`model_key`), its training
    record and its key. A killed training run resumes from its last
    checkpoint."""
    from ..backbone.model import build_model
    from ..backbone.train import load_training_state

    spec = generator.model_spec()
    key = model_key(cfg, spec, tok_hash, n_classes, data_id)
    final = cache / f"model-{key}.safetensors"
    state = cache / f"model-{key}.train.safetensors"
    model = build_model(spec, cfg.model, n_classes=n_classes, seed=cfg.seed).to(device)
    if _cached(final):
        load_training_state(final, model, None)
        _, meta = load_tensors(final)
        record = json.loads(meta.get("train_record", "{}"))
        record["reused"] = True
        return model.eval(), record, key
    _say(progress, f"training the backbone ({spec.train_order} order, {model.n_params() / 1e6:.2f}M parameters, "
                   f"{cfg.train.steps} steps)")
    _cached(state)  # a corrupt training checkpoint is moved aside: training restarts
    result = train_backbone(model, generator, codes, labels, cfg.train, seed=cfg.seed, null_class=n_classes,
                            checkpoint=state, progress=progress)
    record = {"steps": result.steps, "final_loss": result.final_loss, "seconds": result.seconds,
              "tokens": result.tokens, "flops": result.flops, "resumed_from": result.resumed_from,
              "n_params": model.n_params()}
    from ..backbone.train import save_training_state

    opt = torch.optim.AdamW(model.parameters())  # weights only: an empty optimiser state
    if dist.is_main():
        save_training_state(final, model, opt, result.steps, {"train_record": json.dumps(record)})
        state.unlink(missing_ok=True)
    dist.barrier()
    record["reused"] = False
    return model.eval(), record, key


def train_auxiliary(cfg: RunConfig, generator: Any, codes: torch.Tensor, labels: torch.Tensor, n_classes: int,
                    tok_hash: str, cache: Path, *, device: torch.device, progress: bool,
                    data_id: str) -> dict[str, dict]:
    """Train (or load) the extra models the generator asks for
    (``generator.auxiliary_models``, e.g. speculative decoding's draft) —
    each through :func:`train_or_load` with its own ``[model]`` config and
    step count, so it is cached by its own key — and attach them. Returns
    each one's training record and key."""
    from ..backbone.model import InstrumentedModel

    wanted = generator.auxiliary_models(cfg.model)
    if not wanted:
        return {}
    models, records = {}, {}
    for name, mcfg in wanted.items():
        steps = generator.auxiliary_train_steps(name, cfg.train.steps)
        aux_cfg = attrs.evolve(cfg, model=mcfg, train=attrs.evolve(cfg.train, steps=steps))
        _say(progress, f"auxiliary model '{name}' for {cfg.generator.name}")
        model, record, key = train_or_load(aux_cfg, generator, codes, labels, n_classes, tok_hash, cache,
                                           device=device, progress=progress, data_id=data_id)
        models[name] = InstrumentedModel(model)
        records[name] = {**record, "key": key, "model": attrs.asdict(mcfg)}
    generator.attach_models(models)
    return records


def region_mask(layout: TokenLayout, region: str) -> torch.Tensor:
    """``BoolTensor[L]``: True where a code is *known* (kept) when
    ``region`` is regenerated — ``center`` (inpainting the middle half),
    ``border`` (outpainting around the kept middle), or a half: ``left``,
    ``right``, ``top``, ``bottom``."""
    if region not in REGIONS:
        raise ConfigError([f"region: must be one of {', '.join(REGIONS)}, got {region!r}"])
    parts = []
    for h, w in layout.scales:
        r = (torch.arange(h, dtype=torch.float64)[:, None] + 0.5) / h  # (h, 1) in (0, 1)
        c = (torch.arange(w, dtype=torch.float64)[None, :] + 0.5) / w  # (1, w)
        middle = (r > 0.25) & (r < 0.75) & (c > 0.25) & (c < 0.75)
        unknown = {
            "center": middle,
            "border": ~middle,
            "left": (c < 0.5).expand(h, w),
            "right": (c > 0.5).expand(h, w),
            "top": (r < 0.5).expand(h, w),
            "bottom": (r > 0.5).expand(h, w),
        }[region]
        parts.append((~unknown).flatten().repeat_interleave(layout.depth))
    return torch.cat(parts)


def _peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:  # Linux: reset the process's peak resident set size
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _peak_read(device: torch.device) -> float | None:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) * 1024.0
    except OSError:
        pass
    try:
        import resource

        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024.0
    except Exception:  # noqa: BLE001
        return None


def generate_codes(generator: Any, model: Any, chain: Any, labels: torch.Tensor, *, seed: int,
                   known: Known | None = None, progress: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """Generate one code sequence per label in fixed micro-batches of
    :data:`MICRO_BATCH`; image i uses ``RowRNG(seed, i)``. Returns the codes
    and the cost statistics measured by the instrumented ``model``.

    Every micro-batch has exactly :data:`MICRO_BATCH` rows: the last one is
    filled up with extra images (indices n, n + 1, …, labels and known codes
    taken round robin) that are generated and dropped. The kernels pick
    their blocking by the number of rows, so this is what makes image i the
    same bits whatever ``n`` is; the extras' work counts in the time per
    image and their draws in the generator's statistics (more samples of
    the same distribution).

    Under torchrun the micro-batches are shared out round robin over the
    ranks and gathered on every rank in their order, so the codes are those
    of one process; ``seconds_per_image`` is then the ranks' summed compute
    time per image."""
    from tqdm.auto import tqdm

    from ..blocks.rng import RowRNG

    n = labels.shape[0]
    dev = model.device
    starts = list(range(0, n, MICRO_BATCH))
    parts: dict[int, tuple[torch.Tensor, int, float, int]] = {}  # start -> (codes, nfe, seconds, kv bytes)
    _peak_reset()
    for i in tqdm(dist.shard(starts), desc="generate", file=sys.stderr, disable=not progress, leave=False):
        idx = torch.arange(i, i + MICRO_BATCH)  # past n: the extras that fill the last micro-batch
        real = min(n, i + MICRO_BATCH) - i
        src = idx % n
        sub = None if known is None else Known(known.codes[src].to(dev), known.mask[src].to(dev))
        model.reset()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():  # no autograd bookkeeping on any tensor of the decoding loop
            codes = generator.generate(model, chain, labels[src].to(dev), rng=RowRNG(seed, idx.to(dev)), known=sub)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        parts[i] = (codes[:real].cpu(), model.nfe, time.perf_counter() - t0, model.kv_cache_bytes)
    peak = _peak_read(dev)
    if dist.world() > 1:  # every rank's micro-batches, back in their order
        gathered = dist.all_gather((parts, peak))
        parts = {i: v for p, _ in gathered for i, v in p.items()}
        peak = max((pk for _, pk in gathered if pk is not None), default=None)
    codes = torch.cat([parts[i][0] for i in starts])
    nfes = [parts[i][1] for i in starts]
    seconds = 0.0
    for i in starts:
        seconds += parts[i][2]
    kv = max([0] + [parts[i][3] for i in starts])
    L = codes.shape[1]
    stats = {
        "nfe": float(sum(nfes) / len(nfes)),
        "seconds_per_image": seconds / n,
        "tokens_per_second": n * L / seconds if seconds > 0 else float("nan"),
        "kv_cache_bytes": float(kv),
        "peak_memory_bytes": peak,
    }
    return codes, stats


# ---------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------


def save_grid(path: Path, images: torch.Tensor, *, ncol: int = 8, context: torch.Tensor | None = None,
              min_cell: int = 64) -> None:
    """Write an image grid PNG (atomically). With ``context`` (the known
    region of each sample, unknown parts greyed), rows alternate: context,
    then the samples generated from it."""
    from PIL import Image

    x = images
    if context is not None:
        rows = []
        for i in range(0, x.shape[0], ncol):
            rows += [context[i : i + ncol], x[i : i + ncol]]
        x = torch.cat(rows)
    n, c, h, w = x.shape
    scale = max(1, math.ceil(min_cell / max(h, w)))
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if c == 1:
        x = x.repeat(1, 3, 1, 1)
    x = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    h, w, pad = h * scale, w * scale, 2
    nrow = math.ceil(n / ncol)
    canvas = torch.full((3, nrow * (h + pad) + pad, ncol * (w + pad) + pad), 255, dtype=torch.uint8)
    for k in range(n):
        r, q = divmod(k, ncol)
        canvas[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = x[k, :3]
    from ..contract.checkpoint import atomic_write

    with atomic_write(path) as fh:
        Image.fromarray(canvas.permute(1, 2, 0).numpy()).save(fh, format="PNG")


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def results_markdown(runs: list[dict]) -> str:
    keys: list[str] = []
    for r in runs:
        keys += [k for k in r["metrics"] if k not in keys]
    regions = any(r.get("region") for r in runs)  # inpainting/outpainting runs: say which region
    head = ["id", "tokenizer", "generator", "sampler"] + (["region"] if regions else []) + keys
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        c = r["components"]
        cells = [r["id"], c["tokenizer"], c["generator"], " → ".join(c["sampler"]) or "(plain)"]
        cells += [r.get("region") or "–"] if regions else []
        cells += [_fmt(r["metrics"].get(k)) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, record: dict) -> list[dict]:
    """Merge ``record`` into ``out/results.json`` (replacing a run of the
    same id) and rewrite ``results.md``. Returns every run."""
    from .. import __version__

    path = out / "results.json"
    runs: list[dict] = []
    if path.is_file():
        try:
            runs = json.loads(path.read_text()).get("runs", [])
        except (json.JSONDecodeError, AttributeError):
            runs = []
    runs = [r for r in runs if r.get("id") != record["id"]] + [record]
    write_json(path, {"tokenloom_version": __version__, "runs": runs})
    write_text(out / "results.md", "# tokenloom results\n\n" + results_markdown(runs))
    return runs


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def run(cfg: RunConfig, out: str | Path, *, data: tuple[Any, Any] | None = None, region: str | None = None,
        progress: bool = True, registry: Any = None, write_report: bool = True) -> dict:
    """Run ``cfg`` end to end, writing into ``out``; returns the run record
    (as stored in ``results.json``). ``data``: ``(train, holdout)`` image
    sets instead of loading ``cfg.data``; ``region``: regenerate that region
    of held-out images (zero-shot inpainting/outpainting, see
    :data:`REGIONS`) instead of sampling from scratch; ``write_report``:
    False leaves ``results.json``/``results.md`` to the caller (the ablation
    runner writes its own).

    Under torchrun (:mod:`tokenloom.dist`) every rank calls it: rank 0 fits
    and encodes (the others load its cache), all ranks train (DDP), generate
    and score the held-out likelihood (sharded), rank 0 alone decodes,
    computes the metrics and writes files; every rank returns its record."""
    from ..backbone.model import InstrumentedModel
    from ..blocks.sampling import build_chain
    from ..contract.registry import get_registry

    registry = registry or get_registry()
    if cfg.generator is None:
        raise ConfigError(["generator: a run needs a [generator] table (e.g. name = \"raster\")"])
    check_composition(cfg, registry=registry)  # composition errors before anything trains
    out = Path(out)
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    t_start = time.perf_counter()
    progress = progress and dist.is_main()
    lap = StageTimer()  # wall seconds per stage -> record["timings"]

    train_set, holdout = data if data is not None else load_data(cfg)
    if len(holdout) == 0:
        raise ConfigError(["data.n_holdout: the run needs held-out images (for NLL and metrics); set it > 0"])
    n_classes = int(train_set.n_classes)
    if data is None:
        data_id = data_key(cfg)
    else:  # data handed in: key the caches by its content
        from ..contract.checkpoint import tensors_hash

        data_id = tensors_hash({"train": train_set.images, "train_labels": train_set.labels,
                                "holdout": holdout.images, "holdout_labels": holdout.labels})[:16]
    lap("data")

    with dist.main_first():  # rank 0 fits and encodes; the other ranks load what it cached
        tok, tok_hash, tok_reused = fit_tokenizer(cfg, train_set.images, cache, registry=registry, device=device,
                                                  progress=progress, data_id=data_id)
        lap("tokenizer")
        codes = encode_all(tok, tok_hash, {"train": train_set, "holdout": holdout}, cache,
                           key_extra={"data": data_id, "seed": cfg.seed}, device=device)
        lap("encode")
    generator = build_component(registry, "generator", cfg.generator.name,
                                {**cfg.generator.options, "tokenizer": tok}, path="generator")
    if region is not None and not generator.supports_known:
        raise ConfigError([(f"region: generator '{cfg.generator.name}' does not support known tokens "
                            "(inpainting/outpainting needs e.g. 'random' or 'masked')")])
    model, train_record, mkey = train_or_load(cfg, generator, codes["train"], train_set.labels, n_classes, tok_hash,
                                              cache, device=device, progress=progress, data_id=data_id)
    wrapped = InstrumentedModel(model)
    lap("train")
    aux_records = train_auxiliary(cfg, generator, codes["train"], train_set.labels, n_classes, tok_hash, cache,
                                  device=device, progress=progress, data_id=data_id)
    lap("auxiliary")

    chain = build_chain(cfg.sampler, registry=registry)
    chain.bind(SamplerContext(vocab_size=tok.vocab_size, code_embeddings=tok.code_embeddings().detach(),
                              token_embeddings=None if wrapped.token_embeddings() is None
                              else wrapped.token_embeddings().detach()))

    n = cfg.n_samples
    L = tok.layout.length
    known = None
    if region is not None:
        pick = torch.arange(n) % len(holdout)
        labels = holdout.labels[pick].long()
        mask = region_mask(tok.layout, region).expand(n, L).clone()
        known = Known(codes["holdout"][pick], mask)
    else:
        labels = torch.arange(n) % n_classes

    skey = stable_hash({"model": mkey, "generator": component_key(cfg.generator),
                        "sampler": [component_key(s) for s in cfg.sampler],
                        "n": n, "region": region, "seed": cfg.seed, "micro_batch": MICRO_BATCH})
    spath = cache / f"samples-{skey}.safetensors"
    if _cached(spath):
        tensors, meta = load_tensors(spath)
        gen_codes, stats = tensors["codes"], json.loads(meta["stats"])
    else:
        _say(progress, f"generating {n} samples ({cfg.generator.name}, NFE per batch "
                       f"{generator.expected_nfe() if generator.expected_nfe() is not None else 'adaptive'})")
        generator.reset_stats()
        gen_codes, stats = generate_codes(generator, wrapped, chain, labels, seed=cfg.seed, known=known,
                                          progress=progress)
        mine = MICRO_BATCH * len(dist.shard(list(range(0, n, MICRO_BATCH))))  # rows this rank generated
        stats.update(dist.mean_over_ranks(generator.stats(), mine))  # e.g. acceptance_rate, mean_accepted_length
        if dist.is_main():
            save_tensors(spath, {"codes": gen_codes}, {"stats": json.dumps(stats)})
    lap("generate")

    nll = heldout_nll(generator, wrapped, codes["holdout"], holdout.labels)  # sharded over ranks
    lap("nll")
    if not dist.is_main():  # rank 0 decodes, computes the metrics and writes; the others wait for its record
        return dist.broadcast(None)
    with torch.no_grad():
        generated = torch.cat([tok.decode(gen_codes[i : i + 256].to(device)).cpu() for i in range(0, n, 256)])
        hold_codes = codes["holdout"]
        reconstructed = torch.cat([tok.decode(hold_codes[i : i + 256].to(device)).cpu()
                                   for i in range(0, len(holdout), 256)])
    lap("decode")

    stats = dict(stats)
    stats["train_tokens"] = float(train_record.get("tokens", 0))
    stats["train_flops"] = float(train_record.get("flops", 0))
    if aux_records:  # e.g. the draft model: training it is part of this order's cost
        stats["auxiliary_train_flops"] = float(sum(r.get("flops", 0) for r in aux_records.values()))

    metrics: dict[str, Any] = {"nfe": stats["nfe"], "seconds_per_image": stats["seconds_per_image"],
                               "tokens_per_second": stats["tokens_per_second"]}
    if nll is not None:
        metrics.update({"nll_bits_per_image": nll["nll_bits_per_image"],
                        "uniform_bits_per_image": nll["uniform_bits_per_image"]})
    else:
        metrics["nll_bits_per_image"] = None

    ctx = MetricContext(real=holdout.images, generated=generated, real_labels=holdout.labels.long(),
                        generated_labels=labels, codes=hold_codes, reconstructed=reconstructed, stats=stats,
                        tokenizer=tok, model=wrapped, generator=generator, data=holdout, seed=cfg.seed,
                        device=str(device))
    if hasattr(ctx, "cache_dir"):
        ctx.cache_dir = str(cache / "metrics")
    cards = {}
    for i, mc in enumerate(cfg.metrics):
        metric = build_component(registry, "metric", mc.name, dict(mc.options), path=f"metrics.{mc.name}")
        values = metric.compute(ctx)
        for k, v in dict(values).items():  # a metric's number replaces the pipeline's own of the same name
            metrics[k] = None if v is None else float(v)
        cards[mc.name] = metric.eval_card()
        lap(f"metric:{mc.name}")

    full = config_to_dict(cfg)
    run_id = f"{cfg.generator.name}-{stable_hash({'config': full, 'region': region}, 8)}"
    samples_dir = out / "samples"
    grid = samples_dir / f"{run_id}.png"
    context = None
    if known is not None:
        context = _context_images(tok, known, device)
    # image i has class i mod n_classes: with a multiple of n_classes columns, each column is one class
    ncol = 8 if known is not None or n_classes > 16 else n_classes * max(1, math.ceil(8 / n_classes))
    shown = min(n, ncol * 8) if known is None else 64
    shown = shown - shown % ncol if shown >= ncol else shown  # whole rows
    save_grid(grid, generated[:shown], ncol=ncol, context=None if context is None else context[:shown])

    record = {
        "id": run_id,
        "components": {"tokenizer": cfg.tokenizer.name, "generator": cfg.generator.name,
                       "sampler": [s.name for s in cfg.sampler], "metrics": [m.name for m in cfg.metrics]},
        "config": full,
        "region": region,
        "metrics": metrics,
        "stats": stats,
        "nll": nll,
        "train": train_record,
        "auxiliary_models": aux_records,
        "cache": {"tokenizer": tok_hash[:16], "tokenizer_reused": tok_reused, "model": mkey,
                  "model_reused": bool(train_record.get("reused"))},
        "eval_cards": cards,
        "device": str(device),
        "seconds": time.perf_counter() - t_start,
        "artifacts": {"samples": os.path.relpath(grid, out), "results_md": "results.md"},
    }
    lap("report")
    record["timings"] = lap.seconds
    if write_report:
        write_results(out, record)
    return dist.broadcast(record)


def _context_images(tok: Any, known: Known, device: torch.device) -> torch.Tensor:
    """Decoded known codes with the regenerated region greyed out."""
    with torch.no_grad():
        imgs = torch.cat([tok.decode(known.codes[i : i + 256].to(device)).cpu()
                          for i in range(0, known.codes.shape[0], 256)])
    layout = tok.layout
    h, w = layout.grid
    last = layout.scale_slices()[-1]
    m = known.mask[:, last].reshape(-1, h, w, layout.depth).any(-1).float()[:, None]  # (n, 1, h, w)
    m = torch.nn.functional.interpolate(m, size=imgs.shape[-2:], mode="nearest")
    return torch.where(m > 0.5, imgs, torch.zeros_like(imgs))


def run_file(path: str | Path, out: str | Path | None = None, **kwargs: Any) -> dict:
    """Load a TOML config and :func:`run` it (default ``out``: ``runs/<stem>``)."""
    from ..contract.config import load_config

    cfg = load_config(path)
    out = Path(out) if out is not None else Path("runs") / Path(path).stem
    return run(cfg, out, **kwargs)


__all__ = [
    "MICRO_BATCH",
    "REGIONS",
    "component_key",
    "data_key",
    "generate_codes",
    "heldout_nll",
    "model_key",
    "region_mask",
    "results_markdown",
    "run",
    "run_file",
    "save_grid",
    "stable_hash",
    "tokenizer_key",
    "write_results",
]


#: The built-in demo (``tokenloom demo``): 16-px shapes, a learned VQ
#: tokenizer (4×4 codes), the raster order, top-k sampling.
DEMO = {
    "seed": 0,
    "data": {"name": "shapes", "size": 16, "n": 20000, "n_holdout": 200},
    "tokenizer": {"name": "vq", "codebook_size": 64, "downsample": 4, "steps": 600},
    "generator": {"name": "raster"},
    "model": {"n_layer": 4, "d_model": 128, "n_head": 4},
    "train": {"steps": 1500, "batch_size": 64, "lr": 1e-3, "warmup": 100},
    "sampler": [{"name": "top-k", "k": 16}],
    "metrics": {"names": [], "n_samples": 128},
}


def demo_config(registry: Any = None) -> tuple[RunConfig, str | None]:
    """The demo's :class:`RunConfig` and a note when something had to
    change (metrics that are not installed are left out)."""
    from ..contract.config import parse_config
    from ..contract.registry import get_registry

    registry = registry or get_registry()
    raw = json.loads(json.dumps(DEMO))
    notes = []
    want = ["nll", "cost", "fid", "shapes-oracle"]
    have = [m for m in want if m in registry.available("metric")]
    raw["metrics"]["names"] = have
    if "vq" not in registry.available("tokenizer"):
        raw["tokenizer"] = {"name": "pixel", "bits": 1, "pool": 4}
        notes.append("tokenloom demo: the 'vq' tokenizer is not installed; using 'pixel' (1 bit, 4×4 pooling)")
    return parse_config(raw, registry=registry, source="demo"), "\n".join(notes) or None
