"""Several processes: the few torch.distributed helpers tokenloom uses.

``torchrun --nproc_per_node=N -m tokenloom run|ablate ...`` starts N
processes with ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/``MASTER_ADDR`` in their
environment; :func:`init_from_env` turns that into a process group (gloo on
CPU, nccl on GPU, each rank on GPU ``LOCAL_RANK``). Without ``WORLD_SIZE > 1``
nothing is initialised and every helper degrades to the one-process case
(rank 0 of 1), so the same code path serves both.

How the pipeline uses them:

- **rank 0 alone writes files**: stages whose artifact is cached (tokenizer,
  codes) run on rank 0 first (:func:`main_first`) and the other ranks load
  the cached file; checkpoints, samples, reports are written by rank 0 only
  (:func:`is_main`);
- **decisions that depend on the file system** (is this stage cached? is this
  cell finished?) are taken by rank 0 and broadcast (:func:`agree`), so ranks
  never disagree about what to compute;
- **training** wraps the backbone in DDP (:func:`ddp`); **generation** and the
  held-out likelihood are sharded by fixed micro-batches and gathered
  (:func:`all_gather`).

The timeout of collective calls (how long ranks wait for rank 0 to fit a
tokenizer or compute metrics) is ``TOKENLOOM_DIST_TIMEOUT`` seconds (default
two hours).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any

import torch


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_initialized() -> bool:
    import torch.distributed as td

    return td.is_available() and td.is_initialized()


def init_from_env() -> bool:
    """Initialise the default process group from torchrun's environment when
    ``WORLD_SIZE > 1`` (gloo on CPU, nccl when CUDA is available; on GPU each
    rank uses device ``LOCAL_RANK``). Returns whether several processes run.
    Calling it again is harmless."""
    import torch.distributed as td

    if is_initialized():
        return td.get_world_size() > 1
    if env_world_size() <= 1:
        return False
    if not td.is_available():  # pragma: no cover - every supported build has it
        from ..contract.errors import ConfigError

        raise ConfigError(["WORLD_SIZE > 1 but this torch build has no torch.distributed"])
    cuda = torch.cuda.is_available() and os.environ.get("TOKENLOOM_DIST_BACKEND", "") != "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=float(os.environ.get("TOKENLOOM_DIST_TIMEOUT", "7200")))
    td.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return td.get_world_size() > 1


def shutdown() -> None:
    """Destroy the process group (end of a torchrun command)."""
    import torch.distributed as td

    if is_initialized():
        # every rank waits for the others (rank 0 still writes reports after the
        # last collective): tearing gloo down while a peer is connected can abort
        td.barrier()
        td.destroy_process_group()


def rank() -> int:
    import torch.distributed as td

    return td.get_rank() if is_initialized() else 0


def world() -> int:
    import torch.distributed as td

    return td.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Whether this process is rank 0 (the one that writes files)."""
    return rank() == 0


def local_device() -> torch.device | None:
    """This rank's CUDA device under a multi-process nccl run, else None."""
    if world() > 1 and torch.cuda.is_available():
        import torch.distributed as td

        if td.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
    return None


def barrier() -> None:
    if world() > 1:
        import torch.distributed as td

        td.barrier()


def broadcast(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable objects)."""
    if world() == 1:
        return obj
    import torch.distributed as td

    box = [obj]
    td.broadcast_object_list(box, src=src)
    return box[0]


def agree(value: Any) -> Any:
    """Rank 0's ``value`` on every rank — for decisions that read the file
    system (is a stage cached?), so that no two ranks disagree."""
    return broadcast(value, 0)


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if world() == 1:
        return [obj]
    import torch.distributed as td

    out: list[Any] = [None] * world()
    td.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over ranks (a new tensor; ``t`` is untouched)."""
    if world() == 1:
        return t.clone()
    import torch.distributed as td

    out = t.detach().clone()
    td.all_reduce(out, op=td.ReduceOp.SUM)
    return out


def mean_over_ranks(stats: dict[str, Any], weight: float) -> dict[str, Any]:
    """Each key of ``stats`` averaged over the ranks that report it, rank by
    rank weighted by ``weight`` (e.g. the images it generated); one process:
    ``stats`` unchanged. Exact for per-image means; a ratio of counts (an
    acceptance rate) is only approximated by the weighted mean of the ranks'
    ratios."""
    if world() == 1:
        return dict(stats)
    gathered = all_gather((dict(stats), float(weight)))
    keys: list[str] = []
    for d, _ in gathered:
        keys += [k for k in d if k not in keys]
    out: dict[str, Any] = {}
    for k in keys:
        pairs = [(float(d[k]), w) for d, w in gathered if d.get(k) is not None and w > 0]
        total = sum(w for _, w in pairs)
        out[k] = sum(v * w for v, w in pairs) / total if total else None
    return out


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the body first (computing and caching an artifact); the
    other ranks wait, then run the body and find the cache."""
    if world() > 1 and not is_main():
        barrier()
    yield  # an error on rank 0 ends the command (torchrun then stops every rank)
    if world() > 1 and is_main():
        barrier()


def shard(items: list[Any]) -> list[Any]:
    """This rank's items: ``items[rank::world]`` (round robin, so the work
    of fixed-size micro-batches is spread evenly and deterministically)."""
    return items[rank() :: world()]


def ddp(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` wrapped in DistributedDataParallel (gradients averaged over
    ranks in backward; rank 0's weights broadcast at construction)."""
    from torch.nn.parallel import DistributedDataParallel

    dev = next(model.parameters()).device
    ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


__all__ = [
    "agree",
    "all_gather",
    "all_reduce_sum",
    "barrier",
    "broadcast",
    "ddp",
    "env_world_size",
    "init_from_env",
    "is_initialized",
    "is_main",
    "local_device",
    "main_first",
    "mean_over_ranks",
    "rank",
    "shard",
    "shutdown",
    "world",
]
