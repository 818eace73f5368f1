"""The end-to-end run: data → tokenizer → codes → model → samples → metrics → report.

:func:`run` executes one :class:`~tokenloom.config.RunConfig` as a sequence of stages, each a
function of this module: :func:`prepare_data`, :func:`fit_tokenizer`, :func:`encode_all`,
:func:`train_or_load` (and :func:`train_auxiliary`), :func:`generate_or_load`, the held-out
likelihood, decoding, :func:`compute_metrics` and :func:`write_run`. The tokenizer, generator and
sampler chain are built once, by the composition check that runs before anything trains
(:func:`tokenloom.pipeline_check.check_composition`), and handed on.

Every stage's artifact is cached under ``<out>/cache/`` by a hash of exactly what it depends on
(:mod:`tokenloom.running.cache`), so a second run that changes only the sampler chain reuses the
tokenizer and the model, and a run killed at any point resumes:

=============  ==================================================================
stage          cache key
=============  ==================================================================
tokenizer      data config, tokenizer table, image shape, seed; a learned
               tokenizer's fit resumes mid-run
codes          tokenizer weights (content hash), data config, seed; a sharded
               memory-mapped store (:mod:`tokenloom.running.codestore`)
               that resumes shard by shard
model          tokenizer hash × ``model_spec()`` (train order, length, vocab, ...)
               × ``[model]`` × ``[train]`` × classes × seed; training checkpoints
               resume mid-run
samples        model hash × generator table × sampler chain × n_samples × region
=============  ==================================================================

Outputs (DESIGN.md, "Outputs of a run directory"): ``results.json`` (runs
merged by id, so several configs can share one directory and one table),
``results.md`` (:mod:`tokenloom.running.results`) and ``samples/<run-id>.png``
(:mod:`tokenloom.running.images`).
"""

from __future__ import annotations

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
from ..backbone.instrumented import InstrumentedModel
from ..backbone.model import build_model
from ..backbone.train import heldout_nll, load_training_state, save_training_state
from ..backbone.train import train as train_backbone
from ..blocks.data import ImageSet, open_dataset
from ..contract.checkpoint import load_tensors, save_tensors, save_tokenizer
from ..contract.config import RunConfig, config_to_dict
from ..contract.errors import CheckpointError, ConfigError
from ..contract.interfaces import Known, MetricContext, SamplerContext
from ..contract.registry import build_component, get_registry
from ..evaluation.evalcard import evaluate
from .cache import (
    cache_ok,
    cached,
    codes_key,
    component_key,
    data_content_key,
    data_key,
    model_key,
    samples_key,
    stable_hash,
    tokenizer_hash,
    tokenizer_key,
)
from .conditioning import (
    build_conditioner,
    conditioner_state,
    generation_table,
    heldout_table,
    install,
    read_prompts,
    reads_labels,
    training_table,
)
from .generation import (
    MICRO_BATCH,
    REGIONS,
    context_images,
    decode_all,
    generate_codes,
    region_mask,
)
from .images import save_grid
from .machine import environment, resolve_device
from .pipeline_check import build_tokenizer, preflight
from .results import inside, results_markdown, safe_name, write_results
from .tokenizer_fit import fit_seeded


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


# ---------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------


def load_data(cfg: RunConfig) -> tuple[Any, Any]:
    """The training set (streamed from disk for ``folder`` and ``hf``:
    :func:`tokenloom.blocks.streaming.open_dataset`) and the held-out set (in memory: metrics
    read its pixels)."""
    holdout = open_dataset(cfg.data, split="holdout", seed=cfg.seed)
    if not isinstance(holdout, ImageSet):
        holdout = holdout.materialize()
    return open_dataset(cfg.data, split="train", seed=cfg.seed), holdout


def prepare_data(cfg: RunConfig, data: tuple[Any, Any] | None) -> tuple[Any, Any, str]:
    """The training and held-out sets (``data``, or loaded from ``cfg.data``) and the ``data_id``
    that keys the caches (the config, or the content of sets handed in)."""
    train_set, holdout = data if data is not None else load_data(cfg)
    if len(holdout) == 0:
        raise ConfigError(["data.n_holdout: the run needs held-out images (for NLL and metrics); set it > 0"])
    data_id = data_key(cfg) if data is None else data_content_key(train_set, holdout)
    return train_set, holdout, data_id


def fit_tokenizer(cfg: RunConfig, images: torch.Tensor, cache: Path, *, registry: Any = None,
                  device: torch.device, progress: bool, data_id: str,
                  tokenizer: Any = None) -> tuple[Any, str, bool]:
    """The fitted tokenizer, its identity (a hash of its config key and
    weights) and whether it came from the cache. ``tokenizer``: the run's
    tokenizer as built (unfitted; built here from ``cfg`` when None) — it is
    fitted, or loaded from the cache, in place."""
    tok = tokenizer if tokenizer is not None else build_tokenizer(cfg, registry or get_registry())
    tok.to(device)
    key = tokenizer_key(cfg, data_id)
    path = cache / f"tokenizer-{key}.safetensors"
    if cache_ok(path):
        tensors, meta = load_tensors(path)
        try:
            tok.load_state_dict(tensors, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {path} does not fit tokenizer '{cfg.tokenizer.name}': {exc}") from None
        return tok.eval(), tokenizer_hash(key, meta["sha256"]), True
    _say(progress, f"fitting tokenizer '{cfg.tokenizer.name}' on {images.shape[0]} images")
    state = cache / f"tokenizer-{key}.train.safetensors"
    fit_seeded(tok, images, seed=cfg.seed, device=device, progress=progress, checkpoint=state)
    digest = save_tokenizer(path, tok, name=cfg.tokenizer.name, options=dict(cfg.tokenizer.options))
    state.unlink(missing_ok=True)
    return tok, tokenizer_hash(key, digest), False


def encode_all(tok: Any, tok_hash: str, sets: dict[str, Any], cache: Path, *, key_extra: Any,
               device: torch.device, batch_size: int = 256, in_memory: tuple[str, ...] = ("holdout",),
               latent_dtype: str = "float32", shard_rows: int | None = None) -> dict[str, Any]:
    """Codes of every split, encoded once into the code store ``cache/codes-<key>/``
    (:mod:`tokenloom.running.codestore`), keyed by the tokenizer's identity and ``key_extra`` (what
    identifies the images). Splits in ``in_memory`` come back as tensors (``LongTensor[N, L]``, or
    ``FloatTensor[N, L, D]`` latents), the others as memory-mapped
    :class:`~tokenloom.running.codestore.CodeArray`. A killed encoding resumes at its first
    missing shard; under torchrun every rank encodes its share of the missing shards (call it on
    every rank). Streamed images are decoded by DataLoader workers. ``shard_rows``: rows per shard
    of a new store (default :data:`~tokenloom.running.codestore.SHARD_ROWS`)."""
    from ..blocks.streaming import is_lazy
    from .codestore import CodeStore, code_dtype, encode_shards

    key = codes_key(tok_hash, key_extra)
    store = CodeStore(cache / f"codes-{key}", key)
    continuous = bool(getattr(tok, "continuous", False))
    dtype = code_dtype(None if continuous else tok.vocab_size, continuous=continuous, latent_dtype=latent_dtype)
    row_shape = [tok.layout.length] + ([int(tok.token_dim)] if continuous else [])
    if not dist.agree(store.complete() if dist.is_main() else None):
        if dist.is_main():
            store.prepare({split: {"n": len(data), "row_shape": row_shape, "dtype": dtype}
                           for split, data in sets.items()}, tokenizer=tok_hash, overwrite=True,
                          shard_rows=shard_rows)
        dist.barrier()
        todo = dist.agree(store.missing() if dist.is_main() else None)

        def encode(split: str, a: int, b: int) -> Any:
            images = sets[split].images
            chunks = [list(range(i, min(i + batch_size, b))) for i in range(a, b, batch_size)]
            batches = images.batches(chunks) if is_lazy(images) else (images[c[0] : c[-1] + 1] for c in chunks)
            with torch.no_grad():
                parts = [tok.encode(x.to(device)).cpu() for x in batches]
            return torch.cat(parts).numpy() if parts else None

        encode_shards(store, todo, encode, rank=dist.rank(), world=dist.world())
        dist.barrier()
        if dist.is_main():
            store.finish()
        dist.barrier()
    out: dict[str, Any] = {}
    for split in sets:
        codes = store.read(split)
        out[split] = codes.tensor() if split in in_memory else codes
    return out


def train_or_load(cfg: RunConfig, generator: Any, codes: torch.Tensor, labels: torch.Tensor, n_classes: int,
                  tok_hash: str, cache: Path, *, device: torch.device, progress: bool,
                  data_id: str, conditioner: Any = None, table: Any = None,
                  head: Any = None) -> tuple[Any, dict, str]:
    """The trained backbone (cached by :func:`model_key`), its training
    record and its key. A killed training run resumes from its last
    checkpoint. ``labels``: each training image's row of the condition
    table (its class label without a conditioner); ``n_classes``: the
    table's rows (the null condition is row ``n_classes``); ``conditioner``
    and ``table`` (:class:`~tokenloom.running.conditioning.ConditionTable`):
    the run's conditioner and its encoded training conditions (None: class
    labels, the backbone's own table). ``head``: a callable building the
    run's continuous :class:`~tokenloom.interfaces.Head` (None: built from
    ``[head]`` with the process-wide registry when the spec is continuous;
    a discrete spec's head is the backbone's own output layer)."""
    spec = generator.model_spec()
    if head is None and spec.token_dim:
        from .pipeline_check import build_head

        def head() -> Any:
            return build_head(cfg, get_registry(), generator.tokenizer)
    key = model_key(cfg, spec, tok_hash, n_classes, data_id)
    final = cache / f"model-{key}.safetensors"
    state = cache / f"model-{key}.train.safetensors"
    model = build_model(spec, cfg.model, n_classes=n_classes, seed=cfg.seed, conditioner=conditioner,
                        conditions=None if table is None else table.prefix,
                        head=head if spec.token_dim else None).to(device)
    meta_extra = {} if conditioner is None else {"conditioner": conditioner_state(conditioner)}
    if cached(final):
        load_training_state(final, model, None)
        _, meta = load_tensors(final)
        record = json.loads(meta.get("train_record", "{}"))
        record["reused"] = True
        return model.eval(), record, key
    _say(progress, f"training the backbone ({spec.train_order} order, {model.n_params() / 1e6:.2f}M parameters, "
                   f"{cfg.train.steps} steps)")
    cached(state)  # a corrupt training checkpoint is moved aside: training restarts
    result = train_backbone(model, generator, codes, labels, cfg.train, seed=cfg.seed, null_class=n_classes,
                            checkpoint=state, progress=progress)
    record = {"steps": result.steps, "final_loss": result.final_loss, "seconds": result.seconds,
              "tokens": result.tokens, "flops": result.flops, "resumed_from": result.resumed_from,
              "n_params": model.n_params()}
    if model.token_head is not None:  # a continuous head: its share of the FLOPs, and its name
        record.update({"head": cfg.head_name, "head_flops": result.head_flops})
    opt = torch.optim.AdamW(model.parameters())  # weights only: an empty optimiser state
    if dist.is_main():
        save_training_state(final, model, opt, result.steps, {"train_record": json.dumps(record), **meta_extra})
        state.unlink(missing_ok=True)
    dist.barrier()
    record["reused"] = False
    return model.eval(), record, key


def train_auxiliary(cfg: RunConfig, generator: Any, codes: torch.Tensor, labels: torch.Tensor, n_classes: int,
                    tok_hash: str, cache: Path, *, device: torch.device, progress: bool,
                    data_id: str, conditioner: Any = None, table: Any = None,
                    models_out: list | None = None) -> dict[str, dict]:
    """Train (or load) the extra models the generator asks for
    (``generator.auxiliary_models``, e.g. speculative decoding's draft) —
    each through :func:`train_or_load` with its own ``[model]`` config and
    step count, so it is cached by its own key — and attach them. Returns
    each one's training record and key; ``models_out`` (a list) receives
    the models (their condition tables follow the main model's)."""
    wanted = generator.auxiliary_models(cfg.model)
    if not wanted:
        return {}
    models, records = {}, {}
    for name, mcfg in wanted.items():
        steps = generator.auxiliary_train_steps(name, cfg.train.steps)
        aux_cfg = attrs.evolve(cfg, model=mcfg, train=attrs.evolve(cfg.train, steps=steps))
        _say(progress, f"auxiliary model '{name}' for {cfg.generator.name}")
        model, record, key = train_or_load(aux_cfg, generator, codes, labels, n_classes, tok_hash, cache,
                                           device=device, progress=progress, data_id=data_id,
                                           conditioner=conditioner, table=table)
        models[name] = InstrumentedModel(model)
        if models_out is not None:
            models_out.append(model)
        records[name] = {**record, "key": key, "model": attrs.asdict(mcfg)}
    generator.attach_models(models)
    return records


def bind_chain(chain: Any, tok: Any, model: Any) -> Any:
    """Give the sampler chain what its samplers may use: the vocabulary and the code and token
    embeddings (of the fitted tokenizer and the trained backbone). Returns the chain. A continuous
    tokenizer has neither a vocabulary nor code embeddings: ``vocab_size`` 0, ``code_embeddings`` None."""
    token_embeddings = model.token_embeddings()
    continuous = bool(getattr(tok, "continuous", False))
    code_embeddings = None if continuous else tok.code_embeddings().detach()
    chain.bind(SamplerContext(vocab_size=0 if continuous else tok.vocab_size, code_embeddings=code_embeddings,
                              token_embeddings=None if token_embeddings is None else token_embeddings.detach()))
    return chain


def sample_conditions(n: int, tok: Any, holdout: Any, holdout_codes: torch.Tensor, n_classes: int,
                      region: str | None) -> tuple[torch.Tensor, Known | None]:
    """The class label of every image to generate and, when ``region`` is regenerated, the known
    codes (held-out images round robin): image i has class i mod ``n_classes`` from scratch."""
    if region is None:
        return torch.arange(n) % n_classes, None
    pick = torch.arange(n) % len(holdout)
    mask = region_mask(tok.layout, region).expand(n, tok.layout.length).clone()
    return holdout.labels[pick].long(), Known(holdout_codes[pick], mask)


def generate_or_load(cfg: RunConfig, generator: Any, model: Any, chain: Any, labels: torch.Tensor,
                     known: Known | None, cache: Path, *, model_id: str, region: str | None,
                     progress: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """The generated codes and the generation statistics (cost, and the generator's own, e.g.
    acceptance rates), cached by the model, generator, sampler chain, n and region."""
    n = labels.shape[0]
    spath = cache / f"samples-{samples_key(cfg, model_id, n=n, region=region, micro_batch=MICRO_BATCH)}.safetensors"
    if cached(spath):
        tensors, meta = load_tensors(spath)
        return tensors["codes"], json.loads(meta["stats"])
    nfe = generator.expected_nfe()
    _say(progress, f"generating {n} samples ({cfg.generator.name}, NFE per batch "
                   f"{nfe if nfe is not None else 'adaptive'})")
    generator.reset_stats()
    codes, stats = generate_codes(generator, model, chain, labels, seed=cfg.seed, known=known, progress=progress)
    mine = MICRO_BATCH * len(dist.shard(list(range(0, n, MICRO_BATCH))))  # rows this rank generated
    stats.update(dist.mean_over_ranks(generator.stats(), mine))  # e.g. acceptance_rate, mean_accepted_length
    if dist.is_main():
        save_tensors(spath, {"codes": codes}, {"stats": json.dumps(stats)})
    return codes, stats


def cost_stats(stats: dict[str, float], train_record: dict, aux_records: dict[str, dict]) -> dict[str, float]:
    """The generation statistics with the training cost added (tokens, FLOPs; auxiliary models')."""
    stats = dict(stats)
    stats["train_tokens"] = float(train_record.get("tokens", 0))
    stats["train_flops"] = float(train_record.get("flops", 0))
    if "head_flops" in train_record:  # a continuous head (diffusion, flow): its share of train_flops
        stats["train_head_flops"] = float(train_record["head_flops"])
    if aux_records:  # e.g. the draft model: training it is part of this order's cost
        stats["auxiliary_train_flops"] = float(sum(r.get("flops", 0) for r in aux_records.values()))
    return stats


def pipeline_metrics(stats: dict[str, float], nll: dict[str, float] | None) -> dict[str, Any]:
    """The numbers every run reports, whatever its metrics: cost and held-out likelihood."""
    metrics: dict[str, Any] = {"nfe": stats["nfe"], "seconds_per_image": stats["seconds_per_image"],
                               "tokens_per_second": stats["tokens_per_second"]}
    if nll is not None:
        metrics.update({"nll_bits_per_image": nll["nll_bits_per_image"],
                        "uniform_bits_per_image": nll["uniform_bits_per_image"]})
    else:
        metrics["nll_bits_per_image"] = None
    for key in ("head_steps", "head_flops_per_image"):  # a continuous head's sampling cost, counted apart
        if key in stats:
            metrics[key] = stats[key]
    return metrics


def heldout_stats(nll: dict[str, float] | None, n_images: int) -> dict[str, float]:
    """The held-out likelihood the pipeline computed, as metrics read it from ``ctx.stats``
    (``heldout_nll_bits_per_image``, ..., ``heldout_images``): the ``nll`` metric uses it
    instead of scoring the same codes again. Empty when the order has no exact likelihood."""
    if nll is None:
        return {}
    return {**{f"heldout_{k}": float(v) for k, v in nll.items() if v is not None}, "heldout_images": float(n_images)}


def compute_metrics(cfg: RunConfig, ctx: MetricContext, metrics: dict[str, Any], *, registry: Any,
                    lap: StageTimer) -> dict[str, Any]:
    """Run every configured metric on ``ctx``; their numbers go into ``metrics`` (a metric's
    number replaces the pipeline's own of the same name). Returns the eval cards by metric."""
    cards = {}
    for mc in cfg.metrics:
        metric = build_component(registry, "metric", mc.name, dict(mc.options), path=f"metrics.{mc.name}")
        result = evaluate(metric, ctx)
        for k, v in result.values.items():  # a metric's number replaces the pipeline's own of the same name
            metrics[k] = None if v is None else float(v)
        cards[mc.name] = result.card
        lap(f"metric:{mc.name}")
    return cards


def write_samples(path: Path, generated: torch.Tensor, *, tok: Any, known: Known | None, n_classes: int,
                  device: torch.device) -> None:
    """The run's sample grid: whole rows, one class per column when it fits; with known codes,
    each row of samples under the context it was generated from."""
    n = generated.shape[0]
    context = None if known is None else context_images(tok, known, device)
    # image i has class i mod n_classes: with a multiple of n_classes columns, each column is one class
    ncol = 8 if known is not None or n_classes > 16 else n_classes * max(1, math.ceil(8 / n_classes))
    shown = min(n, ncol * 8) if known is None else 64
    shown = shown - shown % ncol if shown >= ncol else shown  # whole rows
    save_grid(path, generated[:shown], ncol=ncol, context=None if context is None else context[:shown])


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
    registry = registry or get_registry()
    # everything a run refuses (composition, data, device), reported together before anything trains
    parts = preflight(cfg, registry=registry, data_given=data is not None)
    generator = parts.generator
    if region is not None and not generator.supports_known:
        raise ConfigError([(f"region: generator '{cfg.generator.name}' does not support known tokens "
                            "(inpainting/outpainting needs e.g. 'random' or 'masked')")])
    out = Path(out)
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    t_start = time.perf_counter()
    progress = progress and dist.is_main()
    lap = StageTimer()  # wall seconds per stage -> record["timings"]

    train_set, holdout, data_id = prepare_data(cfg, data)
    n_classes = int(train_set.n_classes)
    conditioner = build_conditioner(cfg, registry, train_set)  # None: class labels (no [conditioner])
    train_table = training_table(conditioner, train_set, cfg.conditioner.name if cfg.conditioner else "class")
    model_data_id = data_id
    if conditioner is not None:  # the model depends on the conditioner and what it fitted
        model_data_id = f"{data_id}:{stable_hash({'conditioner': cfg.conditioner.table(), 'state': conditioner.state()}, 16)}"
    lap("data")
    with dist.main_first():  # rank 0 fits; the other ranks load what it cached
        tok, tok_hash, tok_reused = fit_tokenizer(cfg, train_set.images, cache, device=device, progress=progress,
                                                  data_id=data_id, tokenizer=parts.tokenizer)
        lap("tokenizer")
    # every rank encodes its share of the code store's missing shards, then reads the whole store
    codes = encode_all(tok, tok_hash, {"train": train_set, "holdout": holdout}, cache,
                       key_extra={"data": data_id, "seed": cfg.seed}, device=device)
    lap("encode")
    head = None
    if parts.head is not None and parts.head.continuous:  # built again under the run's seed by build_model
        from .pipeline_check import build_head

        def head() -> Any:
            return build_head(cfg, registry, parts.tokenizer)
    model, train_record, mkey = train_or_load(cfg, generator, codes["train"], train_table.index,
                                              train_table.n_rows, tok_hash, cache, device=device, progress=progress,
                                              data_id=model_data_id, conditioner=conditioner, table=train_table,
                                              head=head)
    wrapped = InstrumentedModel(model)
    lap("train")
    backbones: list[Any] = [model]
    aux_records = train_auxiliary(cfg, generator, codes["train"], train_table.index, train_table.n_rows, tok_hash,
                                  cache, device=device, progress=progress, data_id=model_data_id,
                                  conditioner=conditioner, table=train_table, models_out=backbones)
    lap("auxiliary")

    chain = bind_chain(parts.chain, tok, wrapped)
    labels, known = sample_conditions(cfg.n_samples, tok, holdout, codes["holdout"], n_classes, region)
    gen_table = None
    model_id = mkey
    if conditioner is not None:  # the prompts' table (class labels: the same rows as in training)
        pick = None if region is None else torch.arange(cfg.n_samples) % len(holdout)
        prompts = read_prompts(cfg.prompts) if cfg.prompts is not None and region is None else None
        gen_table = generation_table(conditioner, holdout, cfg.n_samples, prompts=prompts, pick=pick)
        install(backbones, conditioner, gen_table)
        labels = gen_table.index
        if not reads_labels(conditioner):
            model_id = f"{mkey}:{stable_hash([c.caption for c in gen_table.conditions], 16)}"
    gen_codes, stats = generate_or_load(cfg, generator, wrapped, chain, labels, known, cache, model_id=model_id,
                                        region=region, progress=progress)
    lap("generate")
    nll_labels = holdout.labels
    if conditioner is not None and not reads_labels(conditioner):  # the held-out images' own conditions
        held = heldout_table(conditioner, holdout)
        install(backbones, conditioner, held)
        nll_labels = held.index
    nll = heldout_nll(generator, wrapped, codes["holdout"], nll_labels)  # sharded over ranks
    lap("nll")
    if not dist.is_main():  # rank 0 decodes, computes the metrics and writes; the others wait for its record
        return dist.broadcast(None)
    generated = decode_all(tok, gen_codes, device)
    reconstructed = decode_all(tok, codes["holdout"], device)
    lap("decode")

    stats = cost_stats(stats, train_record, aux_records)
    metrics = pipeline_metrics(stats, nll)
    generated_labels = labels if gen_table is None else gen_table.labels
    generated_conditions = None
    if gen_table is not None:
        generated_conditions = [gen_table.conditions[int(i)] for i in gen_table.index]
    ctx = MetricContext(real=holdout.images, generated=generated, real_labels=holdout.labels.long(),
                        generated_labels=generated_labels, generated_conditions=generated_conditions,
                        codes=codes["holdout"], reconstructed=reconstructed,
                        stats={**stats, **heldout_stats(nll, len(holdout))}, tokenizer=tok, model=wrapped,
                        generator=generator, data=holdout, seed=cfg.seed, device=str(device))
    if hasattr(ctx, "cache_dir"):
        ctx.cache_dir = str(cache / "metrics")
    cards = compute_metrics(cfg, ctx, metrics, registry=registry, lap=lap)

    full = config_to_dict(cfg)
    run_id = f"{cfg.generator.name}-{stable_hash({'config': full, 'region': region}, 8)}"
    grid = inside(out, out / "samples" / f"{safe_name(run_id)}.png")
    write_samples(grid, generated, tok=tok, known=known,
                  n_classes=n_classes if gen_table is None else gen_table.n_rows, device=device)
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
        **({} if gen_table is None else {"conditioning": {
            "conditioner": cfg.conditioner.name,
            "prompts": [conditioner.describe(c) for c in gen_table.conditions][:64],
            "n_prompts": gen_table.n_rows}}),
        "device": str(device),
        "environment": environment(device),
        "seconds": time.perf_counter() - t_start,
        "artifacts": {"samples": os.path.relpath(grid, out), "results_md": "results.md"},
    }
    lap("report")
    record["timings"] = lap.seconds
    if write_report:
        write_results(out, record)
    return dist.broadcast(record)


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


#: The built-in demo (``tokenloom demo``): 16-px shapes, a learned patchwise VQ
#: tokenizer (8×8 codes of a 128-code book, each code a function of its own 2×2
#: patch: its held-out reconstructions pass the shapes oracle 1.000 of the time),
#: the raster order with AdaLN class conditioning, top-p 0.95 sampling.
#: Settings and measured figures: docs/recipes.md.
DEMO = {
    "seed": 0,
    "data": {"name": "shapes", "size": 16, "n": 20000, "n_holdout": 200},
    "tokenizer": {"name": "vq", "codebook_size": 128, "downsample": 2, "steps": 1200, "encoder": "patchwise"},
    "generator": {"name": "raster"},
    "model": {"n_layer": 4, "d_model": 128, "n_head": 4, "cond": "adaln"},
    "train": {"steps": 750, "batch_size": 64, "lr": 4e-3, "warmup": 100},
    "sampler": [{"name": "top-p", "p": 0.95}],
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
