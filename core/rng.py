"""Counter-based randomness: every random number is a pure function of
(seed, image index, step, stream, counter).

This is what makes image *i* depend only on ``(seed, i)``: the draws for a row
do not depend on which other rows share its batch, on the batch size, on the
number of processes or on the device. Numbers come from a 32-bit integer hash
(``lowbias32`` by Chris Wellons) evaluated with int64 tensor arithmetic that
never overflows, so CPU and CUDA give identical bits.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding values in [0, 2^32)."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    x = x ^ (x >> 16)
    return x


def _mix(h: torch.Tensor, v: torch.Tensor | int) -> torch.Tensor:
    return _hash32(h ^ _hash32(torch.as_tensor(v, dtype=torch.int64, device=h.device) + 0x9E3779B9))


class RowRNG:
    """Random numbers for a batch of images, row *r* seeded by
    ``(seed, index[r])``.

    ``uniform(step, *shape)`` returns ``FloatTensor[B, *shape]`` in (0, 1);
    ``gumbel`` and ``categorical`` build on it. Use a distinct ``stream`` for
    each independent use within one step (e.g. acceptance uniforms vs.
    resampling draws).
    """

    def __init__(self, seed: int, index: torch.Tensor | list[int], device: torch.device | str | None = None):
        index = torch.as_tensor(index, dtype=torch.int64)
        if device is not None:
            index = index.to(device)
        self.seed = int(seed)
        self.index = index
        self.device = index.device
        base = _hash32(torch.full_like(index, self.seed & _M32) ^ ((self.seed >> 32) & _M32))
        self._row_key = _mix(base, index & _M32)  # [B]

    def __len__(self) -> int:
        return self.index.numel()

    def subset(self, rows: torch.Tensor | slice) -> "RowRNG":
        """The generator for a subset of rows (same per-image streams)."""
        return RowRNG(self.seed, self.index[rows], self.device)

    def _bits(self, step: int, numel: int, stream: int) -> torch.Tensor:
        key = _mix(_mix(self._row_key, int(step) & _M32), int(stream) & _M32)  # [B]
        ctr = torch.arange(numel, dtype=torch.int64, device=self.device)
        return _hash32(_hash32(key[:, None] ^ ctr[None, :]) + key[:, None])  # [B, numel]

    def uniform(self, step: int, *shape: int, stream: int = 0) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= int(s)
        bits = self._bits(step, numel, stream) >> 8  # 24 random bits
        u = (bits.to(torch.float64) + 0.5) / float(1 << 24)
        return u.to(torch.float32).reshape(len(self), *shape)

    def gumbel(self, step: int, *shape: int, stream: int = 0) -> torch.Tensor:
        u = self.uniform(step, *shape, stream=stream).double()
        return (-torch.log(-torch.log(u))).float()

    def categorical(self, logits: torch.Tensor, step: int, *, stream: int = 0) -> torch.Tensor:
        """One draw per row from ``softmax(logits)`` ([B, V] or [B, k, V]) by
        the Gumbel-max trick; ``-inf`` entries are never drawn."""
        g = self.gumbel(step, *logits.shape[1:], stream=stream).to(logits.device)
        return torch.argmax(logits.float() + g, dim=-1)
