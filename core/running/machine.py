"""The machine a run uses: the device it computes on, and the peak memory of a stretch of work
(the GPU's peak allocation, or on the CPU the process's peak resident set size: Linux ``/proc``,
``getrusage`` elsewhere), and :func:`environment`, what a run record says about the machine."""

from __future__ import annotations

import torch

from ..backbone.dist import local_device
from ..contract.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """The device a config's ``device`` names: ``auto`` (CUDA when available), ``cpu``, ``cuda``,
    ``cuda:1``; under torchrun on GPUs, ``auto``/``cuda`` are this rank's GPU."""
    if local_device() is not None and name in ("auto", "cuda"):  # torchrun on GPUs: this rank's GPU
        return local_device()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use = "use 'auto', 'cpu', 'cuda' or 'cuda:<index>'"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError([f"device: unknown device {name!r} ({use})"]) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError([f"device: {name!r} asked for, but CUDA is not available (use 'auto' or 'cpu')"])
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ConfigError([f"device: {name!r} does not exist (this machine has {n} GPU{'' if n == 1 else 's'})"])
    if dev.type not in ("cpu", "cuda") and not (dev.type == "mps" and torch.backends.mps.is_available()):
        raise ConfigError([f"device: {name!r} is not a device tokenloom runs on here ({use})"])
    return dev


def environment(device: torch.device) -> dict:
    """What a run's numbers depend on besides its config, for its record:
    library versions, the device, the CPU thread count (part of the
    training caches' keys, see :func:`tokenloom.running.cache.tokenizer_key`)
    and torch's determinism flags."""
    import platform

    import numpy as np

    env = {
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(device)
        env["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return env


def reset_peak_memory() -> None:
    """Start measuring: reset the CUDA peak statistics and (Linux) the process's peak RSS."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:  # Linux: reset the process's peak resident set size
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_memory_bytes(device: torch.device) -> float | None:
    """The peak since :func:`reset_peak_memory` in bytes: CUDA's peak allocation on ``device``, or
    the process's peak resident set size (None when neither can be read)."""
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


__all__ = ["environment", "peak_memory_bytes", "reset_peak_memory", "resolve_device"]
