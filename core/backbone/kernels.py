"""The CPU kernels of the backbone: one idea — how a block's products are computed, fast and
batch-independent, without changing what they compute.

- :class:`PlainLinear` — the linears as ``torch.nn.functional`` calls
  (training, accelerators, a single row); :data:`PLAIN_LINEAR` is the one
  instance everyone shares.
- :class:`CPULinear` — the same three products (``linear``, ``gelu_tanh``,
  ``add``) for inference on the CPU through oneDNN with prepacked weights;
  ``TOKENLOOM_ONEDNN=0`` (read when a model is built) switches it off.
- :func:`attend` — scaled dot-product attention, with two batched products
  instead of SDPA's CPU flash kernel for a decoding step of many rows
  (:data:`BMM_ATTENTION_PAIRS`).

:func:`tokenloom.model.block_forward` takes its ``linear`` from here; nothing
here knows about blocks, caches or positions.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F


class PlainLinear:
    """The linears of :func:`block_forward` as plain ``torch.nn.functional``
    calls (training, accelerators, single rows): ``linear(x, w, b)``, and the
    two products :class:`CPULinear` fuses — ``gelu_tanh`` (the MLP's hidden
    layer) and ``add`` (a residual branch added to the stream)."""

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """``x W^T + b``: ``x`` ``[..., in]``, ``w`` ``[out, in]`` -> ``[..., out]``."""
        return F.linear(x, w, b)

    def gelu_tanh(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """``gelu(x W^T + b)`` with the tanh approximation (GPT-2's MLP)."""
        return F.gelu(F.linear(x, w, b), approximate="tanh")

    def add(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, other: torch.Tensor) -> torch.Tensor:
        """``other + (x W^T + b)``: a residual branch added to the stream ``other``."""
        return other + F.linear(x, w, b)


PLAIN_LINEAR = PlainLinear()


class CPULinear(PlainLinear):
    """``F.linear`` for inference on the CPU, through oneDNN with each weight
    reordered once into its blocked layout ("prepacked", the way
    ``torch.compile``'s CPU backend runs frozen linears).

    Why: on the development machine (AMD EPYC, 2 cores) ``F.linear`` goes to
    MKL, whose fp32 GEMM reaches about half of what oneDNN's kernels do for
    the few-row products of a decoding step (bench/decode.py, docs/
    benchmarks.md), and MKL's result for a row depends on how many rows
    share the call (below 16) while oneDNN's does not — so with oneDNN an
    image's logits are the same bits whatever its batch. A single row (one
    image, one token) stays with ``F.linear``: MKL's matrix-vector product
    is the faster there — so a micro-batch of one image may differ from the
    same image among others in the last bits of its logits (rarely in a
    sampled token); with ``TOKENLOOM_ONEDNN=0`` (MKL everywhere) so may
    any batch of fewer than 16 rows.

    ``gelu_tanh`` and ``add`` run the MLP's GELU and the residual addition
    inside the same oneDNN kernel (post-ops): the addition gives the same
    bits as a separate one, the fused GELU differs from ``F.gelu`` by
    rounding (~1e-7).

    A packed weight is kept with the weight's version counter and made again
    after any in-place change (an optimizer step, ``load_state_dict``). Used
    only without autograd, for float32 on the CPU, and only where oneDNN
    is built in; ``TOKENLOOM_ONEDNN=0`` turns it off (then ``F.linear``
    everywhere). If the oneDNN call fails, it says so once and falls back.
    """

    def __init__(self) -> None:
        # id(w) -> (w, its version counter, its storage address, the packed weight)
        self._packed: dict[int, tuple[torch.Tensor, int, int, torch.Tensor]] = {}
        self.enabled = _onednn_wanted()
        # looked up once (~1 µs a time)
        self._op = torch.ops.mkldnn._linear_pointwise if self.enabled else None
        self._binary = torch.ops.mkldnn._linear_pointwise.binary if self.enabled else None

    def __getstate__(self) -> dict:  # a model that is pickled (torch.save(model)) packs again where it is loaded
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        packed = self._packed_for(x, w)
        return F.linear(x, w, b) if packed is None else self._op(x, packed, b, "none", [], "")

    def gelu_tanh(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        packed = self._packed_for(x, w)
        if packed is None:
            return super().gelu_tanh(x, w, b)
        return self._op(x, packed, b, "gelu", [], "tanh")

    def add(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, other: torch.Tensor) -> torch.Tensor:
        packed = self._packed_for(x, w)
        if packed is None or other.shape != (*x.shape[:-1], w.shape[0]) or other.dtype != x.dtype:
            return super().add(x, w, b, other)
        return self._binary(x, other, packed, b, "add")

    def _packed_for(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
        """``w`` packed for oneDNN, or None where ``F.linear`` serves (off,
        not float32, a single row)."""
        if not self.enabled or x.dtype != torch.float32 or x.numel() <= x.shape[-1]:
            return None
        hit = self._packed.get(id(w))
        if hit is None or hit[0] is not w or hit[1] != w._version or hit[2] != w.data_ptr():
            hit = self._pack(w)
            if hit is None:
                return None
        return hit[3]

    def _pack(self, w: torch.Tensor) -> tuple[torch.Tensor, int, int, torch.Tensor] | None:
        try:
            with torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 16)
        except Exception as exc:  # noqa: BLE001 - a torch without these ops: plain F.linear from now on
            warnings.warn(f"tokenloom: oneDNN linear unavailable ({exc!s:.100}); using F.linear", stacklevel=3)
            self.enabled = False
            return None
        if len(self._packed) > 4096:
            self._packed.clear()
        hit = self._packed[id(w)] = (w, w._version, w.data_ptr(), packed)
        return hit


def _onednn_wanted() -> bool:
    """Whether :class:`CPULinear` should use oneDNN: not turned off by
    ``TOKENLOOM_ONEDNN=0``, and torch has oneDNN and the private operators it calls."""
    if os.environ.get("TOKENLOOM_ONEDNN", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn  # private operators (what torch.compile's CPU backend calls): check they exist
    return hasattr(ops, "_linear_pointwise") and hasattr(ops, "_reorder_linear_weight")


#: From this many (row, head) pairs on, one query each (a decoding step of a
#: batch) attends through two batched products instead of SDPA's CPU flash
#: kernel, which runs a pair of tiny products per pair: 13–30 % faster at 64–128
#: pairs on the development machine, slower below 32.
BMM_ATTENTION_PAIRS = 64


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, dropout: float = 0.0) -> torch.Tensor:
    """``softmax(q kᵀ / √hd) v`` for ``q`` ``[B, H, T, hd]`` over keys/values
    ``[B, H, S, hd]``; ``mask`` as SDPA takes it (None, ``"causal"`` or a
    boolean mask). Scaled dot-product attention, except for the batched
    one-query case on the CPU (:data:`BMM_ATTENTION_PAIRS`)."""
    B, H, T, hd = q.shape
    if (T == 1 and mask is None and not dropout and B * H >= BMM_ATTENTION_PAIRS and q.device.type == "cpu"
            and q.dtype == torch.float32 and not q.requires_grad):
        S = k.shape[2]
        w = torch.bmm(q.reshape(B * H, 1, hd) * hd**-0.5, k.reshape(B * H, S, hd).transpose(1, 2))  # (BH, 1, S)
        return torch.bmm(torch.softmax(w, -1), v.reshape(B * H, S, hd)).view(B, H, 1, hd)
    causal = isinstance(mask, str)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal,
                                          dropout_p=dropout)


__all__ = ["BMM_ATTENTION_PAIRS", "PLAIN_LINEAR", "CPULinear", "PlainLinear", "attend"]
