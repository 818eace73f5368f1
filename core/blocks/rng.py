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


def _hash32_int(x: int) -> int:
    """:func:`_hash32` of one Python integer (the same bits, no tensor ops)."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _hash32_(x: torch.Tensor) -> torch.Tensor:
    """:func:`_hash32` in place on an int64 tensor the caller owns (the
    same bits with fewer temporaries)."""
    x.bitwise_and_(_M32)
    x.bitwise_xor_(x >> 16)
    x.mul_(0x7FEB352D).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 15)
    x.mul_(0x846CA68B).bitwise_and_(_M32)
    return x.bitwise_xor_(x >> 16)


#: XOR-ed into the stream of normal draws (:meth:`RowRNG.normal`): their own stream space.
_NORMAL_STREAM = 1 << 31

#: Steps whose row keys :class:`RowRNG` derives in one pass (a decoding loop
#: asks for consecutive steps; the keys are the same bits either way).
_KEY_BLOCK = 64

#: Most numbers :class:`RowRNG` derives ahead in one pass for consecutive
#: steps (per kind, stream and draw size): 2^20 float32 = 4 MiB.
_AHEAD_ELEMENTS = 1 << 20


class RowRNG:
    """Random numbers for a batch of images, row *r* seeded by
    ``(seed, index[r])``.

    ``uniform(step, *shape)`` returns ``FloatTensor[B, *shape]`` in (0, 1);
    ``gumbel`` and ``categorical`` build on it; ``normal`` gives standard
    normal noise (continuous heads: diffusion and flow sampling). Use a distinct ``stream`` for
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
        self._keys: dict[tuple[int, int], torch.Tensor] = {}  # (stream, block) -> [B, _KEY_BLOCK] step keys
        self._ctr: dict[int, torch.Tensor] = {}  # numel -> arange(numel)
        # draws derived ahead: (kind, stream, numel) -> (first step, [B, n, numel]); and the last step asked
        self._ahead: dict[tuple[str, int, int], tuple[int, torch.Tensor]] = {}
        self._last: dict[tuple[str, int, int], int] = {}

    def __len__(self) -> int:
        return self.index.numel()

    def subset(self, rows: torch.Tensor | slice) -> RowRNG:
        """The generator for a subset of rows (same per-image streams)."""
        return RowRNG(self.seed, self.index[rows], self.device)

    def _key(self, step: int, stream: int) -> torch.Tensor:
        """``[B]``: ``_mix(_mix(row_key, step), stream)`` — the key of
        (image, step, stream). The scalar halves of the two mixes are
        hashed in Python, and the keys of ``_KEY_BLOCK`` consecutive steps
        are derived in one tensor pass and kept."""
        step, stream = int(step) & _M32, int(stream) & _M32
        block, offset = divmod(step, _KEY_BLOCK)
        keys = self._keys.get((stream, block))
        if keys is None:
            first = block * _KEY_BLOCK
            hs = torch.tensor([_hash32_int(s + 0x9E3779B9) for s in range(first, first + _KEY_BLOCK)],
                              dtype=torch.int64, device=self.device)  # [K]
            keys = _hash32_(self._row_key[:, None] ^ hs[None, :])  # (B, K) = _mix(row_key, step)
            keys = _hash32_(keys ^ _hash32_int(stream + 0x9E3779B9))  # _mix(., stream)
            if len(self._keys) > 256:  # a long-lived generator: forget old blocks
                self._keys.clear()
            self._keys[(stream, block)] = keys
        return keys[:, offset]

    def _bits(self, steps: range, numel: int, stream: int) -> torch.Tensor:
        """``[B, len(steps), numel]`` random int64 in [0, 2^32): counter
        ``c`` of (image, step, stream) is ``h(h(key ^ c) + key)``."""
        if len(steps) == 1:
            key = self._key(steps[0], stream)[:, None, None]  # (B, 1, 1)
        else:
            key = torch.stack([self._key(s, stream) for s in steps], 1)[:, :, None]  # (B, n, 1)
        ctr = self._ctr.get(numel)
        if ctr is None:
            ctr = self._ctr[numel] = torch.arange(numel, dtype=torch.int64, device=self.device)
        return _hash32_(_hash32_(key ^ ctr).add_(key))

    def _derive(self, kind: str, steps: range, numel: int, stream: int) -> torch.Tensor:
        """``[B, len(steps), numel]`` draws of ``kind`` ("uniform", "gumbel" or "normal")."""
        if kind == "normal":
            return self._normal(steps, numel, stream)
        # (k + 0.5) / 2^24 rounded to float32: float32 arithmetic rounds k + 0.5 once and the
        # power-of-two division is exact, so this is the float64 computation's float32 result
        u = (self._bits(steps, numel, stream) >> 8).to(torch.float32).add_(0.5).div_(float(1 << 24))  # 24 bits
        if kind == "uniform":
            return u
        return u.double().log_().neg_().log_().neg_().float()  # -log(-log(u)) in float64

    def _normal(self, steps: range, numel: int, stream: int) -> torch.Tensor:
        """``[B, len(steps), numel]`` standard normals by Box–Muller: number
        ``c`` uses the counters ``2c`` and ``2c + 1`` of (image, step,
        stream ⊕ 2^31) — its own stream space, so a normal draw never
        reuses the bits of a uniform or Gumbel draw at the same
        ``(step, stream)`` — computed in float64, returned as float32."""
        bits = self._bits(steps, 2 * numel, (int(stream) & _M32) ^ _NORMAL_STREAM)  # (B, n, 2 numel)
        u = (bits >> 8).double().add_(0.5).div_(float(1 << 24))  # 24-bit uniforms in (0, 1)
        u1, u2 = u[..., 0::2], u[..., 1::2]
        return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)).float()

    def _draw(self, kind: str, step: int, numel: int, stream: int) -> tuple[torch.Tensor, bool]:
        """``([B, numel], shared)``: the draws of one step. When a caller asks
        for consecutive steps of the same kind, stream and size (a decoding
        loop), the draws of up to ``_KEY_BLOCK`` steps ahead are derived in
        one pass (at most ``_AHEAD_ELEMENTS`` numbers) and served as views —
        ``shared`` says so; the bits are the same either way."""
        step, what = int(step), (kind, int(stream) & _M32, numel)
        last, self._last[what] = self._last.get(what), step
        hit = self._ahead.get(what)
        if hit is not None and 0 <= step - hit[0] < hit[1].shape[1]:
            return hit[1][:, step - hit[0]], True
        n = min(_KEY_BLOCK, _AHEAD_ELEMENTS // max(1, len(self) * numel))
        if last != step - 1 or n < 2:
            return self._derive(kind, range(step, step + 1), numel, stream)[:, 0], False
        if len(self._ahead) > 32:  # many kinds of draws: forget the old ones
            self._ahead.clear()
        block = self._derive(kind, range(step, step + n), numel, stream)
        self._ahead[what] = (step, block)
        return block[:, 0], True

    def _numbers(self, kind: str, step: int, shape: tuple[int, ...], stream: int) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= int(s)
        out, shared = self._draw(kind, step, numel, stream)
        return (out.clone() if shared else out).reshape(len(self), *shape)  # the caller's own tensor

    def uniform(self, step: int, *shape: int, stream: int = 0) -> torch.Tensor:
        return self._numbers("uniform", step, shape, stream)

    def gumbel(self, step: int, *shape: int, stream: int = 0) -> torch.Tensor:
        return self._numbers("gumbel", step, shape, stream)

    def normal(self, step: int, *shape: int, stream: int = 0) -> torch.Tensor:
        """``FloatTensor[B, *shape]`` standard normal noise; element ``c`` (of
        the flattened ``shape``) is a pure function of (seed, image, step,
        stream, c)."""
        return self._numbers("normal", step, shape, stream)

    def categorical(self, logits: torch.Tensor, step: int, *, stream: int = 0) -> torch.Tensor:
        """One draw per row from ``softmax(logits)`` ([B, V] or [B, k, V]) by
        the Gumbel-max trick; ``-inf`` entries are never drawn."""
        numel = 1
        for s in logits.shape[1:]:
            numel *= s
        g = self._draw("gumbel", step, numel, stream)[0].view(logits.shape).to(logits.device)
        return torch.argmax(logits.float() + g, dim=-1)
