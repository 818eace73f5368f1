"""``tokenloom sample``: new samples from a finished run, without retraining.

:func:`sample_run` reads a run directory's ``results.json`` (the run's config), rebuilds the
run's components, loads the tokenizer and the trained backbone from ``<run>/cache`` (refusing —
with a message naming the missing file — to fit or train anything), puts the asked-for
conditions in the backbone's condition table (prompts for a caption or text-encoder run, class
names or ids for a class-conditional one), generates with the run's sampler chain (or the one
given) and writes an image grid, one prompt per column.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..contract.config import RunConfig, parse_config
from ..contract.errors import ConfigError, InputError
from ..contract.interfaces import Condition
from .cache import cached, data_key, model_key, stable_hash, tokenizer_key
from .conditioning import (
    ConditionTable,
    build_conditioner,
    describe_conditions,
    install,
    reads_labels,
    training_table,
)


def parse_sampler(text: str) -> dict[str, Any]:
    """A ``--sampler`` value: ``name`` or ``name:key=value,key=value`` (values read as TOML:
    ``top-k:k=16``, ``cfg:scale=3.0``) -> the ``[[sampler]]`` table."""
    import tomllib

    name, _, rest = text.partition(":")
    table: dict[str, Any] = {"name": name.strip()}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq:
            raise ConfigError([f"--sampler {text!r}: expected name:key=value,key=value"])
        try:
            table[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            table[key.strip()] = value.strip()  # a bare word: a string
    return table


def pick_run(run_dir: Path, run_id: str | None) -> dict:
    """The record of ``run_id`` in ``run_dir/results.json`` (default: the only run, or the last)."""
    from .results import read_runs

    if not (run_dir / "results.json").is_file() and not (run_dir / "records").is_dir():
        raise InputError(f"{run_dir}: no results.json — not a finished run directory (tokenloom run ... --out DIR)")
    runs = [r for r in read_runs(run_dir) if r.get("config", {}).get("generator")]
    if not runs:
        raise InputError(f"{run_dir}/results.json: no finished runs")
    if run_id is None:
        return runs[-1]
    for r in runs:
        if r["id"] == run_id:
            return r
    raise InputError(f"{run_dir}: no run {run_id!r} (runs: {', '.join(r['id'] for r in runs)})")


def sample_conditions(cfg: RunConfig, conditioner: Any, data: Any, *, prompts: list[str], classes: list[str],
                      n: int) -> tuple[ConditionTable, list[Condition]]:
    """The table of what to generate (image ``i`` gets the ``i mod len(asked)``-th condition
    asked for) and the conditions asked for."""
    if reads_labels(conditioner):
        if prompts:
            raise ConfigError([("--prompt: this run is conditioned on class labels; use --class "
                               f"({', '.join(data.class_names)})")])
        names = list(data.class_names)
        labels = []
        for c in classes or names:
            if c in names:
                labels.append(names.index(c))
            elif c.isdigit() and int(c) < len(names):
                labels.append(int(c))
            else:
                raise ConfigError([f"--class {c!r}: not a class of this run ({', '.join(names)})"])
        conds = [Condition(label=y) for y in labels]
        index = torch.tensor(labels)[torch.arange(n) % len(labels)]
        # the class table: every class, so cond is the class id (as in training)
        full = [Condition(label=i) for i in range(len(names))]
        prefix = None if conditioner is None else conditioner.encode(full)
        return ConditionTable(full, index, prefix, index.clone()), conds
    if classes:
        raise ConfigError([(f"--class: this run is conditioned on '{cfg.conditioner.name}' (captions); "
                           "use --prompt \"two red squares\"")])
    if not prompts:
        raise ConfigError(["--prompt: give at least one prompt (repeat --prompt for several)"])
    conds = [Condition(caption=p) for p in prompts]
    index = torch.arange(n) % len(conds)
    return ConditionTable(conds, index, conditioner.encode(conds), None), conds


def sample_run(run_dir: str | Path, *, prompts: tuple[str, ...] = (), classes: tuple[str, ...] = (), n: int = 16,
               seed: int | None = None, samplers: tuple[str, ...] = (), out: str | Path | None = None,
               run_id: str | None = None, registry: Any = None, progress: bool = True) -> dict:
    """Generate ``n`` images from the finished run in ``run_dir`` (see the module docstring) and
    write their grid to ``out`` (default ``<run_dir>/samples/sample-<hash>.png``). Returns
    ``{"path", "run", "conditions", "seed", "nfe", "seconds_per_image", "codes"}``."""
    from ..backbone.instrumented import InstrumentedModel
    from ..contract.registry import get_registry
    from .generation import decode_all, generate_codes
    from .images import save_grid
    from .machine import resolve_device
    from .pipeline import bind_chain, fit_tokenizer, load_data, train_auxiliary, train_or_load
    from .pipeline_check import check_composition

    run_dir = Path(run_dir)
    if n < 1:
        raise ConfigError([f"-n: expected a positive number of images, got {n}"])
    registry = registry or get_registry()
    record = pick_run(run_dir, run_id)
    threads = (record.get("environment") or {}).get("cpu_threads")
    if isinstance(threads, int) and threads > 0 and threads != torch.get_num_threads():
        torch.set_num_threads(threads)  # the run's: part of its cache keys, and its numerics (issue 14)
    raw = dict(record["config"])
    if samplers:
        raw["sampler"] = [parse_sampler(s) for s in samplers]
    cfg = parse_config(raw, registry=registry, source=f"{run_dir}/results.json ({record['id']})")
    parts = check_composition(cfg, registry=registry)
    device = resolve_device(cfg.device)
    cache = run_dir / "cache"
    train_set, _holdout = load_data(cfg)
    data_id = data_key(cfg)
    tok_path = cache / f"tokenizer-{tokenizer_key(cfg, data_id)}.safetensors"
    if not cached(tok_path):
        raise InputError(f"{run_dir}: the run's tokenizer is not in its cache ({tok_path.name}); run it again "
                         "with tokenloom run")
    tok, tok_hash, _ = fit_tokenizer(cfg, train_set.images, cache, device=device, progress=False, data_id=data_id,
                                     tokenizer=parts.tokenizer)
    conditioner = build_conditioner(cfg, registry, train_set)
    table = training_table(conditioner, train_set, cfg.conditioner.name if cfg.conditioner else "class")
    gen_table, asked = sample_conditions(cfg, conditioner, train_set, prompts=list(prompts), classes=list(classes),
                                         n=n)  # what to generate: checked before anything is loaded
    model_data_id = data_id
    if conditioner is not None:
        model_data_id = f"{data_id}:{stable_hash({'conditioner': cfg.conditioner.table(), 'state': conditioner.state()}, 16)}"
    generator = parts.generator
    key = model_key(cfg, generator.model_spec(), tok_hash, table.n_rows, model_data_id)
    if not cached(cache / f"model-{key}.safetensors"):
        raise InputError(f"{run_dir}: the run's trained model is not in its cache (model-{key}.safetensors); "
                         "tokenloom sample never trains — run the config with tokenloom run first")
    wanted = generator.auxiliary_models(cfg.model)
    for name, mcfg in (wanted or {}).items():
        import attrs

        aux_cfg = attrs.evolve(cfg, model=mcfg, train=attrs.evolve(
            cfg.train, steps=generator.auxiliary_train_steps(name, cfg.train.steps)))
        akey = model_key(aux_cfg, generator.model_spec(), tok_hash, table.n_rows, model_data_id)
        if not cached(cache / f"model-{akey}.safetensors"):
            raise InputError(f"{run_dir}: the run's auxiliary model '{name}' is not in its cache; run it again "
                             "with tokenloom run")
    head = None
    if parts.head is not None and parts.head.continuous:  # the run's continuous head, from this registry
        from .pipeline_check import build_head

        def head() -> Any:
            return build_head(cfg, registry, parts.tokenizer)
    model, _, _ = train_or_load(cfg, generator, torch.zeros(0, 1, dtype=torch.long), table.index, table.n_rows,
                                tok_hash, cache, device=device, progress=False, data_id=model_data_id,
                                conditioner=conditioner, table=table, head=head)
    backbones: list[Any] = [model]
    train_auxiliary(cfg, generator, torch.zeros(0, 1, dtype=torch.long), table.index, table.n_rows, tok_hash,
                    cache, device=device, progress=False, data_id=model_data_id, conditioner=conditioner,
                    table=table, models_out=backbones)
    install(backbones, conditioner, gen_table)
    wrapped = InstrumentedModel(model)
    chain = bind_chain(parts.chain, tok, wrapped)
    seed = cfg.seed if seed is None else int(seed)
    codes, stats = generate_codes(generator, wrapped, chain, gen_table.index, seed=seed, progress=progress)
    images = decode_all(tok, codes, device)
    # image i is condition i mod k: a multiple of k columns puts one condition per column (8 or more wide)
    k = len(asked)
    ncol = min(n, k * max(1, math.ceil(8 / k)) if k <= 8 else (k if k <= 16 else 8))
    names = describe_conditions(conditioner, gen_table)
    if out is None:
        out = run_dir / "samples" / f"sample-{stable_hash({'run': record['id'], 'c': names, 'n': n, 's': seed}, 8)}.png"
    out = Path(out)
    save_grid(out, images, ncol=ncol)
    shown = [conditioner.describe(c) if conditioner is not None else train_set.class_names[c.label] for c in asked]
    return {"path": str(out), "run": record["id"], "conditions": shown, "seed": seed, "nfe": stats["nfe"],
            "seconds_per_image": stats["seconds_per_image"], "codes": codes}


__all__ = ["parse_sampler", "pick_run", "sample_run"]
