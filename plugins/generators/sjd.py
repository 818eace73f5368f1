"""``sjd``: Speculative Jacobi Decoding — Teng et al. 2024, "Accelerating
Auto-regressive Text-to-Image Generation with Training-free Speculative
Jacobi Decoding", https://arxiv.org/abs/2410.01699 (ICLR 2025).

Training-free on a raster (LlamaGen-style) model: the model drafts for
itself. Each image keeps a window of ``window`` draft tokens after its
committed prefix; one forward pass feeds the last committed token and the
whole window under the causal mask and returns, for every window slot, the
distribution p of that position given everything before it.

1. **Verify** (probabilistic, as in speculative sampling): drafts are judged
   left to right; draft x, drawn from q — the distribution its slot had in
   the *previous* Jacobi iteration — is accepted when u < min(1, p(x)/q(x));
   at the first rejection the token is redrawn from norm(max(p − q, 0)), and
   when the whole window is accepted the last distribution gives one more
   token. (Any acceptance rule in the chain — ``lantern``, ``gsd`` — replaces
   this exact rule.)
2. **Jacobi update**: the slots after the first rejection are not thrown
   away: each gets a fresh draft sampled from its current p (which becomes
   its q for the next iteration) — the fixed-point iteration of Jacobi
   decoding, with the rejection step keeping the output distribution exact.
3. **Initialisation**: the window then slides; new slots at its end get an
   initial draft. ``init = "random"``: a uniformly random code — the paper's
   initialisation and the reference code's default
   (tyshiwo1/Accelerating-T2I-AR-with-SJD: ``multi_token_init_scheme =
   'random'`` in ``model_wrappers/model_loader.py``, ``test_lumina_mgpt.py``,
   ``test_emu3.py``). ``"left"`` (the default here) copies the token to the
   left in the same image row — either committed or the current draft there —
   which is the reference's ``'repeat_horizon'`` (``scheduler/
   jacobi_iteration_lumina_mgpt.py``), the scheme its LlamaGen script
   (``test_llamagen.py``) runs and the closest to this raster LlamaGen
   model; kept as the default for that reason (and so results do not
   change). Differs: in the first column, where there is no left token, the
   reference draws a random code and ``"left"`` here copies the token above
   first. ``"above"`` copies the token one row up (falling back to the left
   one): the reference's vertical scheme is disabled in its code (an
   ``assert False``), so this is ours. The reference's ``'sample_horizon'``
   (resample from the left token's distribution) is not implemented.
   An initialised draft is a fixed token, so its q is one-hot on it, which
   keeps the acceptance test exact.

Each image advances by its own accepted length: its committed length, its
window and its KV-cache prefix (rolled back with per-row
``KVCache.truncate``) are its own, and all its randomness comes from the
run's :class:`~tokenloom.rng.RowRNG` at (iteration, stream), so image *i*
never depends on its batch neighbours. With a greedy chain every
distribution is one-hot and the output equals greedy raster decoding token
for token. NFE per image is the number of Jacobi iterations (< L; the paper
reports about 2× fewer steps); a batch runs until its slowest image is done,
and finished images leave the batch.
"""

from __future__ import annotations

import attrs
import torch

import tokenloom
from tokenloom import speculative as spec


class SJDGenerator(spec.SpeculativeOrder):
    """The raster model, its likelihood, the statistics and the timing come
    from :class:`tokenloom.speculative.SpeculativeOrder`; this is the Jacobi loop."""

    name = "sjd"

    @attrs.frozen
    class Config:
        window: int = attrs.field(default=16, validator=attrs.validators.ge(1))
        init: str = attrs.field(default="left", validator=attrs.validators.in_(("left", "above", "random")))
        baseline: bool = False  # also time plain next-token decoding: speedup_wallclock

    def __init__(self, config: Config, *, tokenizer: tokenloom.Tokenizer):
        super().__init__(config, tokenizer=tokenizer)
        layout = tokenizer.layout
        # the 2-D grid spatial initialisation looks up (none for multi-scale layouts)
        self.grid = (layout.grid[1], layout.depth) if layout.n_scales == 1 else None

    # -- decoding --------------------------------------------------------------

    def _source(self, pos: torch.Tensor) -> torch.Tensor:
        """The flat position an initial draft at ``pos`` copies (the left or
        upper neighbour in the image grid, see ``init``), or -1: a random code."""
        if self.config.init == "random" or self.grid is None:
            return torch.full_like(pos, -1)
        w, depth = self.grid  # flat order: row-major cells, depth-minor
        cell = pos // depth
        left_ok, above_ok = (cell % w) > 0, cell >= w
        left, above = pos - depth, pos - w * depth  # same depth, one cell left / one row up
        if self.config.init == "left":
            src = torch.where(left_ok, left, above)
        else:
            src = torch.where(above_ok, above, left)
        return torch.where(left_ok | above_ok, src, torch.full_like(pos, -1))

    def _fill_window(self, window: torch.Tensor, need: torch.Tensor, committed: torch.Tensor, n: torch.Tensor,
                     u: torch.Tensor) -> torch.Tensor:
        """Initialise the slots ``need`` (``[B, W]``) of ``window`` (slot j
        at flat position ``n + j``): each copies its neighbour — a committed
        token, a kept draft, or, when the neighbour is itself a new slot,
        whatever that slot gets (resolved by pointer jumping, as if filled
        left to right) — or takes the random code ``u · V``."""
        B, W = window.shape
        rows = torch.arange(B, device=window.device)[:, None]
        slot = torch.arange(W, device=window.device).expand(B, W)
        src = self._source(n[:, None] + slot)  # (B, W) flat source position or -1
        in_window = need & (src >= n[:, None])
        ptr = torch.where(in_window, src - n[:, None], slot)  # a new slot points at an earlier slot
        rand = (u * self.V).long().clamp(max=self.V - 1)
        copied = committed[rows, src.clamp(0, committed.shape[1] - 1)]
        value = torch.where(need, torch.where(src < 0, rand, copied), window)  # terminal values
        for _ in range(max(1, (W - 1).bit_length())):
            ptr = ptr.gather(1, ptr)
        return torch.where(need, value.gather(1, ptr), window)

    def decode(self, model, chain: tokenloom.Chain, cond: torch.Tensor, rng: tokenloom.RNG) -> torch.Tensor:
        rule = spec.acceptance_rule(chain)
        L, V, dev = self.L, self.V, model.device
        W = min(self.config.window, L)
        B = cond.shape[0]
        cond = cond.to(dev).long()
        guided = chain.needs_uncond
        out = torch.zeros(B, L, dtype=torch.long, device=dev)

        # state of the active rows (finished rows leave the batch)
        idx = torch.arange(B, device=dev)  # image rows still decoding
        codes = torch.zeros(B, L, dtype=torch.long, device=dev)  # committed tokens
        n = torch.zeros(B, dtype=torch.long, device=dev)  # committed length
        drafts = torch.zeros(B, W, dtype=torch.long, device=dev)  # window: positions n .. n+W-1
        q = torch.zeros(B, W, V, dtype=torch.float64, device=dev)
        u0 = spec.Noise(rng, 0, {"init": (W,)}, dev).uniform("init")
        drafts = self._fill_window(drafts, torch.ones_like(drafts, dtype=torch.bool), codes, n, u0)  # all new
        q = torch.nn.functional.one_hot(drafts, V).double()

        rows_of = lambda c: torch.cat([c, torch.full_like(c, model.null_class)]) if guided else c
        cache = model.new_cache(2 * B if guided else B, L + W + 2)
        last = torch.zeros(B, dtype=torch.long, device=dev)  # x_{n-1} (the class slot at n = 0)
        it = 0
        while idx.numel():
            it += 1
            sub = rng.subset(idx.cpu()) if idx.numel() != B else rng
            k = idx.numel()
            slots = n[:, None] + torch.arange(W + 1, device=dev)  # (k, W+1) sequence index of each input
            inputs = torch.cat([last[:, None], drafts], 1)  # (k, W+1)
            positions = (slots - 1).clamp(max=L - 1)
            if guided:
                inputs, positions = inputs.repeat(2, 1), positions.repeat(2, 1)
            logits = model(inputs, rows_of(cond[idx]), cache=cache, positions=positions)  # (rows, W+1, V)
            processed = spec.process_window(chain, logits[:k], slots, L, logits[k:] if guided else None)
            p = spec.to_probs(chain, processed)  # (k, W+1, V)

            noise = spec.Noise(sub, it, {"accept": (W,), "next": (V,), "jacobi": (W + 1, V), "init": (W,)}, dev)
            n_valid = (L - n).clamp(max=W)
            a, nxt, rejected = spec.verify(rule, chain, p, q, drafts, n_valid, noise.uniform("accept"),
                                           noise.gumbel("next"))
            new_n = (n + a + 1).clamp(max=L)
            self._stats.record(accepted=a, rejected=rejected, committed=new_n - n, drafted=n_valid)

            # commit the accepted prefix and the next token
            ar = torch.arange(W, device=dev)
            kr, kj = (ar[None, :] < a[:, None]).nonzero(as_tuple=True)
            codes[kr, n[kr] + kj] = drafts[kr, kj]
            put = (n + a) < L
            rows = torch.arange(k, device=dev)
            codes[rows[put], (n + a)[put]] = nxt[put]
            lengths = new_n.clone()

            # Jacobi update: slots after the commit get fresh drafts from their current p
            fresh = spec.draw(chain, processed, noise.gumbel("jacobi"))  # (k, W+1)
            src = (a + 1)[:, None] + ar  # slot of this iteration's window feeding new slot j
            carried = src <= W
            srcc = src.clamp(max=W)
            new_drafts = torch.where(carried, fresh.gather(1, srcc), torch.zeros_like(drafts))
            new_q = torch.where(carried[..., None], p.gather(1, srcc[..., None].expand(k, W, V)),
                                torch.zeros_like(q))
            new_drafts = self._fill_window(new_drafts, ~carried, codes, new_n, noise.uniform("init"))  # new slots
            new_q = torch.where(carried[..., None], new_q, torch.nn.functional.one_hot(new_drafts, V).double())

            last = codes[rows, (new_n - 1).clamp(min=0)]
            n, drafts, q = new_n, new_drafts, new_q
            cache.truncate(torch.cat([lengths, lengths]) if guided else lengths)

            done = n >= L
            if done.any():
                out[idx[done]] = codes[done]
                live = (~done).nonzero().flatten()
                idx, codes, n, drafts, q, last = idx[live], codes[live], n[live], drafts[live], q[live], last[live]
                if idx.numel():
                    cache.select_rows(torch.cat([live, live + k]) if guided else live)
        return out


@tokenloom.hookimpl
def register_generators(register):
    register("sjd", SJDGenerator)
