"""``zipar``: training-free parallel decoding of a raster-order model —
ZipAR (He et al. 2024, "ZipAR: Accelerating Auto-regressive Image
Generation through Spatial Locality", https://arxiv.org/abs/2412.04062).

Spatially adjacent tokens matter most for the next one, so row r + 1 need
not wait for row r to finish: ZipAR starts decoding a row as soon as the row
above has ``window`` tokens, and every row in flight advances by one token
per forward pass.

**Training.** None of its own: ``model_spec()`` and ``training_batch()``
are exactly ``raster``'s, so the pipeline trains (and caches) one raster
model and both orders use it.

**Decoding** (the reference implementation's schedule; rows are the
``w · depth`` flat codes of a grid row, ``window`` counts codes):

- row 0 is decoded token by token (the class token predicts its first
  token); row 1 starts once row 0 is complete, fed by row 0's last token;
- row r ≥ 2 starts in the pass after row r − 1 reaches ``window`` tokens.
  Its first token is predicted at raster position (r − 1, last) — still
  undecoded — so a stand-in token is fed there: a copy of the latest token
  of row r − 2 (the reference's choice). When the real last token of row
  r − 1 is sampled it is fed in the next pass (its prediction is not used)
  and the stand-in is hidden from every later query;
- every query sees the class token and the decoded tokens at raster
  positions up to its own — the raster model's context with the not yet
  decoded tail of the rows above missing. The cache is append-only and read
  through an explicit mask (no roll-back needed).

NFE = 2·W + (h − 2)·window for h ≥ 2 rows of W codes (W for one row);
``window = W`` is exactly raster decoding. A window larger than a row is a
configuration error.

No exact likelihood is reported: the samples do not follow the raster
model's likelihood (its held-out NLL is ``raster``'s).
"""

from __future__ import annotations

import attrs
import torch

import tokenloom
from tokenloom.orders import (
    MaskedCache,
    grid_of,
    guidance_rows,
    raster_spec,
    raster_training_batch,
    refuse_known,
    sample_codes,
)


class ZipARGenerator(tokenloom.Generator):
    exact_likelihood = False

    @attrs.frozen
    class Config:
        window: int = attrs.field(default=4, validator=attrs.validators.ge(1))

    def __init__(self, config: Config, *, tokenizer: tokenloom.Tokenizer):
        super().__init__(config, tokenizer=tokenizer)
        h, w, depth = grid_of(tokenizer, "zipar")
        self.h, self.W = h, w * depth  # rows of W flat codes
        if config.window > self.W:
            raise tokenloom.ConfigError(
                f"zipar: window = {config.window} is larger than a row of the token grid ({self.W} codes "
                f"= {w} columns × depth {depth}); use 1 ≤ window ≤ {self.W}")
        self.L, self.V = tokenizer.layout.length, tokenizer.vocab_size

    # -- the raster model ---------------------------------------------------

    def model_spec(self) -> tokenloom.ModelSpec:
        return raster_spec(self.tokenizer)  # identical to raster's: the model is shared

    def training_batch(self, codes: torch.Tensor, cond: torch.Tensor) -> tokenloom.TrainBatch:
        return raster_training_batch(codes, cond, self.L, self.V, where="zipar.training_batch: codes")

    # -- the schedule -------------------------------------------------------

    def schedule(self) -> list[list[tuple[str, int, int]]]:
        """The passes: for each, the inputs it feeds as ``(kind, position,
        source)`` in feeding order — kind ``"cls"`` (the class token),
        ``"token"`` (the code at ``position``), ``"standin"`` (the code at
        ``source`` fed at ``position``) or ``"late"`` (a row's real last
        token, fed for the cache only). An input of kind cls/token/standin
        at position p predicts the code at p + 1."""
        h, W, win = self.h, self.W, self.config.window
        count = [0] * h  # decoded codes per row
        started = [True] + [False] * (h - 1)
        standin: set[int] = set()
        late: list[int] = []
        passes: list[list[tuple[str, int, int]]] = []
        while count[h - 1] < W:
            feed: list[tuple[str, int, int]] = [("late", p, -1) for p in late]
            late = []
            for r in range(1, h):  # row 1 after row 0 is done, row r >= 2 once row r-1 has `window` codes
                if not started[r] and ((r == 1 and count[0] == W) or (r >= 2 and count[r - 1] >= win)):
                    started[r] = True
            for r in range(h):
                if not started[r] or count[r] == W:
                    continue
                if count[r] > 0:
                    feed.append(("token", r * W + count[r] - 1, -1))
                elif r == 0:
                    feed.append(("cls", -1, -1))
                elif count[r - 1] == W:  # the row above just finished: its real last code
                    feed.append(("token", r * W - 1, -1))
                else:  # a stand-in at (r-1, last): the latest code of row r-2
                    feed.append(("standin", r * W - 1, (r - 2) * W + count[r - 2] - 1))
                    standin.add(r * W - 1)
            passes.append(feed)
            for kind, p, _ in feed:
                if kind == "late":
                    continue
                r = (p + 1) // W
                count[r] += 1
                if count[r] == W and r * W + W - 1 in standin:
                    late.append(r * W + W - 1)
        return passes

    def expected_nfe(self) -> int:
        return len(self.schedule())

    # -- decoding -----------------------------------------------------------

    def generate(self, model, chain, cond, *, rng, known=None) -> torch.Tensor:
        refuse_known("zipar", known)
        B, dev = cond.shape[0], model.device
        cond = cond.to(dev).long()
        rows, guided = guidance_rows(cond, chain, model)
        R = rows.shape[0]
        passes = self.schedule()
        n_standin = sum(1 for feed in passes for f in feed if f[0] in ("standin", "late"))
        mc = MaskedCache(model, R, 1 + self.L + n_standin)
        standin_slot: dict[int, int] = {}  # position -> cache slot of its stand-in
        codes = torch.zeros(B, self.L, dtype=torch.long, device=dev)
        for step, feed in enumerate(passes):
            ids, pos = [], []
            for kind, p, src in feed:
                if kind == "cls":
                    ids.append(torch.zeros(B, dtype=torch.long, device=dev))
                elif kind == "standin":
                    ids.append(codes[:, src])
                else:
                    ids.append(codes[:, p])
                pos.append(p)
            slots = mc.append(pos)
            for (kind, p, _), slot in zip(feed, slots):
                if kind in ("late", "token") and p in standin_slot:
                    mc.invalidate(standin_slot.pop(p))  # the real token replaces its stand-in
                if kind == "standin":
                    standin_slot[p] = slot
            key_pos, key_valid = mc.key_tensors(dev)
            q = torch.tensor(pos, device=dev)
            mask = key_valid[None, :] & (key_pos[None, :] <= q[:, None])  # (T, S) raster-causal on positions
            x = torch.stack(ids, 1)
            x = x.repeat(2, 1) if guided else x
            logits = model(x, rows, positions=q, attn_mask=mask, cache=mc.cache)  # (R, T, V)
            use = [t for t, (kind, _, _) in enumerate(feed) if kind != "late"]
            where = torch.tensor([feed[t][1] + 1 for t in use], device=dev)
            codes[:, where] = sample_codes(chain, logits[:, use], rng, B=B, guided=guided, step=step,
                                           n_steps=len(passes), positions=where.expand(B, -1))
        return codes


@tokenloom.hookimpl
def register_generators(register):
    register("zipar", ZipARGenerator)
