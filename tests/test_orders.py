"""The parallel generation orders of issue 9 (next-block, next-cell,
neighboring, par, zipar, random-parallel): training masks leak nothing a
position must predict, every position is finalised exactly once and at the
pass an independent formula says, NFE equals each order's formula, image i
is the same alone or in a batch, and KV-cached decoding equals full
recomputation. Tiny grids, untrained 2-layer models (the properties hold for
any weights)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokenloom
import tokenloom.testing
from tokenloom.backbone.instrumented import InstrumentedModel
from tokenloom.config import ModelConfig, build_component
from tokenloom.model import build_model
from tokenloom.rng import RowRNG
from tokenloom.sampling import SamplerChain

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))
REG = tokenloom.get_registry()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is ~30× faster than two on a loaded
    2-core machine (threads contend); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
GRID_ORDERS = ("next-block", "next-cell", "neighboring", "par", "zipar", "random-parallel")
SCALE_ORDERS = ("next-scale", "next-frequency")
ORDERS = GRID_ORDERS + SCALE_ORDERS + ("next-scale-markov", "depth-stack")
RECORDED = GRID_ORDERS + SCALE_ORDERS + ("depth-stack",)  # draws through SamplerChain.sample
FIXED = ("next-block", "next-cell", "neighboring", "par", "depth-stack") + SCALE_ORDERS  # trained, fixed order


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def pixel(gh: int, gw: int, depth3: bool = False, bits: int = 1):
    """A pixel tokenizer with a gh×gw token grid (depth 3 with per-channel codes)."""
    return build_component(REG, "tokenizer", "pixel", {"bits": bits, "pool": 2, "per_channel": depth3,
                                                       "image_shape": (3, 2 * gh, 2 * gw)}, path="tokenizer")


def generator(name: str, tok, **config):
    return build_component(REG, "generator", name, {**config, "tokenizer": tok}, path="generator")


def tiny_model(spec, seed: int = 0, pos: str = "rope2d") -> InstrumentedModel:
    cfg = ModelConfig(n_layer=2, d_model=16, n_head=2, pos=pos)
    return InstrumentedModel(build_model(spec, cfg, n_classes=3, seed=seed).eval())


class Recorder(SamplerChain):
    """A sampler chain that records every draw: (step, positions [B, k],
    codes [B, k]) in ``calls`` and the raw logits ``[B, k, V]`` in ``logits``."""

    def __init__(self, samplers=()):
        super().__init__(samplers)
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.logits: list[torch.Tensor] = []

    def sample(self, logits, info, rng, *, stream=0):
        out = super().sample(logits, info, rng, stream=stream)
        pos = info.positions if info.positions.dim() == 2 else info.positions[:, None]
        self.calls.append((info.step, pos.clone(), out.reshape(pos.shape).clone()))
        self.logits.append(logits.reshape(*pos.shape, -1).clone())
        return out

    def logits_by_position(self, L: int) -> torch.Tensor:
        """``[B, L, V]``: the logits each position was drawn from."""
        B, V = self.logits[0].shape[0], self.logits[0].shape[-1]
        out = torch.full((B, L, V), float("nan"))
        for (_, pos, _), lg in zip(self.calls, self.logits):
            out.scatter_(1, pos[..., None].expand(-1, -1, V), lg.float())
        return out


def chain(kind: str) -> list:
    build = lambda n, **kw: build_component(REG, "sampler", n, kw, path="sampler")
    return {"plain": [], "topk": [build("top-k", k=3)], "cfg": [build("cfg", scale=2.0), build("temperature", t=0.9)]}[kind]


def draw_config(name: str, h: int, w: int, depth: int, data) -> dict:
    """A valid configuration of ``name`` for an h×w×depth layout."""
    divisors = lambda n: [d for d in range(1, n + 1) if n % d == 0]
    if name == "next-block":
        return {"rows": data.draw(st.sampled_from(divisors(h)))}
    if name == "next-cell":
        return {"cell": data.draw(st.sampled_from(divisors(math.gcd(h, w))))}
    if name == "par":
        return {"regions": data.draw(st.sampled_from(divisors(math.gcd(h, w)))) ** 2}
    if name == "zipar":
        return {"window": data.draw(st.integers(1, w * depth))}
    if name == "random-parallel":
        return {"steps": data.draw(st.integers(2, h * w * depth + 1))}
    return {}


def layout_for(name: str, data) -> tuple[int, int, bool]:
    gh, gw = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    depth3 = False if name == "neighboring" else data.draw(st.booleans())
    return gh, gw, depth3


def expected_nfe(name: str, h: int, w: int, depth: int, cfg: dict) -> int:
    """Each order's NFE formula (LITERATURE.md), written independently of the plugins."""
    L = h * w * depth
    if name == "next-block":
        return h // cfg["rows"]
    if name == "next-cell":
        return (h // cfg["cell"]) * (w // cfg["cell"])
    if name == "neighboring":
        return h + w - 1
    if name == "par":
        n = cfg["regions"]
        return n + (L - n) // n
    if name == "zipar":
        W = w * depth
        return W if h == 1 else 2 * W + (h - 2) * cfg["window"]
    if name == "random-parallel":
        return min(L, cfg["steps"])  # the cosine schedule takes `steps` passes
    raise KeyError(name)


def expected_step(name: str, h: int, w: int, depth: int, cfg: dict) -> torch.Tensor | None:
    """``LongTensor[L]``: the pass at which each flat position is sampled, by
    an independent formula (None where it depends on a random order)."""
    rr, cc, dd = torch.meshgrid(torch.arange(h), torch.arange(w), torch.arange(depth), indexing="ij")
    rr, cc, dd = rr.flatten(), cc.flatten(), dd.flatten()
    if name == "next-block":
        return rr // cfg["rows"]
    if name == "next-cell":
        k = cfg["cell"]
        return (rr // k) * (w // k) + cc // k
    if name == "neighboring":
        return rr + cc
    if name == "par":
        k = math.isqrt(cfg["regions"])
        n = k * k
        rh, rw = h // k, w // k
        t = ((rr % rh) * rw + cc % rw) * depth + dd  # index inside the region
        s = t * n + (rr // rh) * k + cc // rw  # index in PAR's order
        return torch.where(s < n, s, n + (s - n) // n)
    if name == "zipar":
        W, win = w * depth, cfg["window"]
        c = cc * depth + dd
        return torch.where(rr == 0, c, W + (rr - 1) * win + c)
    return None


MS_SCALES = [(1, 4), (2, 4), (1, 2, 4), (1, 2, 3, 4), (3, 4)]


def multiscale(scales=(1, 2, 4), codebook_size: int = 8):
    """A (untrained) VAR multi-scale tokenizer on 8×8 images (finest grid: the last scale)."""
    return build_component(REG, "tokenizer", "multiscale", {"scales": tuple(scales), "downsample": 8 // scales[-1],
                                                            "codebook_size": codebook_size, "code_dim": 4,
                                                            "image_shape": (3, 8, 8)}, path="tokenizer")


def frequency(levels: int = 2, channels: int = 1, size: int = 4, bins: int = 3):
    return build_component(REG, "tokenizer", "frequency", {"levels": levels, "drop_levels": 0, "bins": bins,
                                                           "image_shape": (channels, size, size)}, path="tokenizer")


def case(name: str, data):
    """A tokenizer, a valid config, the NFE formula's value and the pass of
    every position (None where it is data-dependent) for ``name``."""
    if name in ("next-scale", "next-scale-markov"):
        tok = multiscale(data.draw(st.sampled_from(MS_SCALES)))
        sizes = [h * w for h, w in tok.layout.scales]
        step = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        if name == "next-scale":
            return tok, {}, len(sizes), step
        steps = data.draw(st.integers(1, 4))
        return tok, {"steps": steps}, sum(min(steps, n) for n in sizes), None
    if name == "next-frequency":
        tok = frequency(data.draw(st.integers(1, 2)), data.draw(st.sampled_from([1, 3])))
        sizes = [h * w for h, w in tok.layout.scales]
        return tok, {}, len(sizes), torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    gh, gw, depth3 = layout_for(name, data)
    tok = pixel(gh, gw, depth3)
    depth = tok.layout.depth
    if name == "depth-stack":  # one pass per position; the draws (one per code) in flat order
        return tok, {"depth_layers": data.draw(st.integers(1, 2))}, gh * gw, torch.arange(tok.layout.length)
    cfg = draw_config(name, gh, gw, depth, data)
    return tok, cfg, expected_nfe(name, gh, gw, depth, cfg), expected_step(name, gh, gw, depth, cfg)


def run(gen, model, cond, seed: int = 0, kind: str = "plain", index=None):
    rec = Recorder(chain(kind))
    model.reset()
    index = torch.arange(cond.shape[0]) if index is None else index
    out = gen.generate(model, rec, cond, rng=RowRNG(seed, index))
    return out, rec


def logits_of(model, batch) -> torch.Tensor:
    out = model(batch.inputs, batch.cond, positions=batch.positions, attn_mask=batch.attn_mask,
                target_positions=batch.extra.get("target_positions"))
    out = out if isinstance(out, tuple) else (out,)
    return torch.stack([o.float() for o in out], -2)  # (B, T, heads, V)


# ---------------------------------------------------------------------------
# decoding: positions finalised once, at the formula's pass; NFE; determinism
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", RECORDED)
@SETTINGS
@given(data=st.data())
def test_every_position_finalised_exactly_once_at_its_pass(name, data):
    tok, cfg, nfe, ref = case(name, data)
    L = tok.layout.length
    gen = generator(name, tok, **cfg)
    kind = data.draw(st.sampled_from(["plain", "topk", "cfg"]))
    model = tiny_model(gen.model_spec(), seed=data.draw(st.integers(0, 99)))
    B = 3
    cond = torch.tensor([0, 2, 1])
    out, rec = run(gen, model, cond, seed=5, kind=kind)

    assert model.nfe == nfe == gen.expected_nfe(), (name, cfg, model.nfe, nfe)
    draws = L if name == "depth-stack" else nfe  # depth-stack: D draws (depth-head steps) per pass
    assert [c[0] for c in rec.calls] == list(range(draws)), "one draw per step, in order"
    step = torch.cat([torch.full((p.shape[1],), s) for s, p, _ in rec.calls])  # (L,) pass of each draw
    for b in range(B):
        pos = torch.cat([p[b] for _, p, _ in rec.calls])
        vals = torch.cat([v[b] for _, _, v in rec.calls])
        assert sorted(pos.tolist()) == list(range(L)), "every position sampled exactly once"
        assert torch.equal(out[b, pos], vals), "a sampled code was changed afterwards"
        if ref is not None:
            assert torch.equal(step[pos.argsort()], ref), f"{name} {cfg}: positions decoded at the wrong pass"


@pytest.mark.parametrize("name", ORDERS)
@SETTINGS
@given(data=st.data())
def test_image_is_the_same_alone_or_in_a_batch(name, data):
    tok, cfg, nfe, _ = case(name, data)
    gen = generator(name, tok, **cfg)
    model = tiny_model(gen.model_spec(), seed=1, pos=data.draw(st.sampled_from(["rope2d", "learned"])))
    kind = data.draw(st.sampled_from(["plain", "cfg"]))
    cond = torch.tensor([1, 0, 2, 2])
    out, _ = run(gen, model, cond, seed=9, kind=kind)
    again, _ = run(gen, model, cond, seed=9, kind=kind)
    assert torch.equal(out, again)
    i = data.draw(st.integers(0, 3))
    alone, _ = run(gen, model, cond[i : i + 1], seed=9, kind=kind, index=torch.tensor([i]))
    assert torch.equal(alone[0], out[i])
    assert model.nfe == nfe
    other, _ = run(gen, model, cond, seed=10, kind=kind)
    if tok.layout.length >= 4:
        assert not torch.equal(other, out), "the seed does not change the samples"


# ---------------------------------------------------------------------------
# training: nothing leaks from a position's own pass or later
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXED)
@SETTINGS
@given(data=st.data())
def test_training_mask_leaks_nothing_it_must_predict(name, data):
    """A logit that predicts position p must not depend on any code sampled
    in p's own pass or later (the pass taken from decoding itself)."""
    tok, cfg, _, _ = case(name, data)
    L, V = tok.layout.length, tok.vocab_size
    gen = generator(name, tok, **cfg)
    model = tiny_model(gen.model_spec(), seed=2, pos=data.draw(st.sampled_from(["rope2d", "learned"])))
    _, rec = run(gen, model, torch.tensor([0]))
    step = torch.empty(L, dtype=torch.long)
    for s, p, _ in rec.calls:
        step[p[0]] = s

    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    codes = torch.randint(0, V, (2, L), generator=g)
    cond = torch.tensor([1, 3])  # 3: the null class
    base = gen.training_batch(codes, cond)
    targets = base.targets if base.targets.dim() == 3 else base.targets[..., None]
    lmask = base.loss_mask if base.loss_mask.dim() == 3 else base.loss_mask[..., None]
    # which position each (index, head) predicts: the one whose change changes the target
    target_pos = torch.full(targets.shape[1:], -1)
    for j in range(L):
        other = codes.clone()
        other[:, j] = (other[:, j] + 1) % V
        t2 = gen.training_batch(other, cond).targets
        t2 = t2 if t2.dim() == 3 else t2[..., None]
        target_pos[(t2 != targets)[0] & lmask[0]] = j
    assert (target_pos[lmask[0]] >= 0).all(), "every loss term predicts a code"
    assert sorted(set(target_pos[lmask[0]].tolist())) == list(range(L)), "every code is predicted"

    ref = logits_of(model, base)
    for j in range(L):
        other = codes.clone()
        other[:, j] = (other[:, j] + 1 + torch.randint(0, max(V - 1, 1), (2,), generator=g)) % V
        new = logits_of(model, gen.training_batch(other, cond))
        guarded = lmask[0] & (target_pos >= 0)
        guarded &= step[target_pos.clamp(min=0)] <= step[j]  # predicts a code of j's pass or earlier
        if guarded.any():
            diff = (new - ref).abs()[:, guarded].max().item()
            assert diff <= 1e-5, f"{name} {cfg}: code {j} (pass {step[j]}) leaks into a prediction of its own pass or earlier ({diff:.3g})"


def test_leak_test_catches_a_leaking_mask():
    """The property above fails for a next-block model whose blocks may see
    the block they predict (a bidirectional mask)."""
    tok = pixel(2, 2)
    gen = generator("next-block", tok)
    model = tiny_model(gen.model_spec(), seed=0)
    codes = torch.randint(0, tok.vocab_size, (1, 4), generator=torch.Generator().manual_seed(0))
    batch = gen.training_batch(codes, torch.tensor([0]))
    batch.attn_mask = torch.ones(5, 5, dtype=torch.bool)
    ref = logits_of(model, batch)
    other = codes.clone()
    other[0, 1] = (other[0, 1] + 1) % tok.vocab_size  # code 1: input at index 4, target at index 2
    batch2 = gen.training_batch(other, torch.tensor([0]))
    assert torch.equal(logits_of(model, batch2)[0, 2], logits_of(model, gen.training_batch(codes, batch.cond))[0, 2])
    batch2.attn_mask = batch.attn_mask
    assert (logits_of(model, batch2) - ref)[0, 2].abs().max() > 1e-4


def target_positions(gen, codes, cond):
    """``[T, heads]``: the flat position each training output predicts (-1:
    none), found by changing one code at a time."""
    V = gen.tokenizer.vocab_size
    base = gen.training_batch(codes, cond)
    targets = base.targets if base.targets.dim() == 3 else base.targets[..., None]
    lmask = base.loss_mask if base.loss_mask.dim() == 3 else base.loss_mask[..., None]
    out = torch.full(targets.shape[1:], -1)
    for j in range(codes.shape[1]):
        other = codes.clone()
        other[:, j] = (other[:, j] + 1) % V
        t2 = gen.training_batch(other, cond).targets
        t2 = t2 if t2.dim() == 3 else t2[..., None]
        out[((t2 != targets) & lmask)[0]] = j
    return out


@pytest.mark.parametrize("name", FIXED)
@SETTINGS
@given(data=st.data())
def test_decoding_uses_the_teacher_forced_logits(name, data):
    """Teacher forcing on a generated sample reproduces, for every position,
    the logits it was drawn from (neighboring: the mean of the heads that
    predict it) — training and decoding implement the same factorisation."""
    tok, cfg, _, _ = case(name, data)
    L = tok.layout.length
    gen = generator(name, tok, **cfg)
    model = tiny_model(gen.model_spec(), seed=6, pos=data.draw(st.sampled_from(["rope2d", "learned"])))
    cond = torch.tensor([2, 1])
    out, rec = run(gen, model, cond, seed=1)
    used = rec.logits_by_position(L)
    tf = logits_of(model, gen.training_batch(out, cond))  # (B, T, heads, V)
    tpos = target_positions(gen, out[:1], cond[:1])
    for p in range(L):
        sel = (tpos == p).nonzero()
        ref = torch.stack([tf[:, i, hd] for i, hd in sel.tolist()]).mean(0)
        assert (ref - used[:, p]).abs().max() <= 1e-5, f"{name} {cfg}: position {p}"


def test_zipar_sees_what_its_schedule_has_decoded():
    """ZipAR's logits for every position equal the raster model's on an
    independent reconstruction of its decoding: the code at position k is fed
    in the pass after it is sampled (the formula's pass + 1); row r >= 2
    starts from a stand-in at (r-1, last) — a copy of the latest code of row
    r-2 — fed when the row starts and hidden once the real code is fed; every
    token sees the class token and the tokens fed by its own pass at raster
    positions up to its own."""
    h, w = 4, 3
    for win in (1, 2):
        tok = pixel(h, w)
        L, W = h * w, w
        zipar = generator("zipar", tok, window=win)
        model = tiny_model(zipar.model_spec(), seed=8)
        cond = torch.tensor([0, 2])
        out, rec = run(zipar, model, cond, seed=2)
        used = rec.logits_by_position(L)
        step = expected_step("zipar", h, w, 1, {"window": win})
        start = [0] + [W + (r - 1) * win for r in range(1, h)]  # pass at which row r samples its first code
        # slots: (position, fed at pass, hidden from pass, value)
        slots = [(-1, 0, 10**9, torch.zeros(2, dtype=torch.long))]
        slots += [(k, int(step[k]) + 1, 10**9, out[:, k]) for k in range(L - 1)]
        for r in range(2, h):
            if start[r] < step[r * W - 1] + 1:  # row r starts before the real last code above is fed
                src = (r - 2) * W + min(W, start[r] - start[r - 2]) - 1
                slots.append((r * W - 1, start[r], int(step[r * W - 1]) + 1, out[:, src]))
        n = len(slots)
        mask = torch.zeros(n, n, dtype=torch.bool)
        for i, (pi, fi, _, _) in enumerate(slots):
            for j, (pj, fj, hj, _) in enumerate(slots):
                mask[i, j] = pj <= pi and fj <= fi < hj
        x = torch.stack([v for *_, v in slots], 1)
        pos = torch.tensor([p for p, *_ in slots])
        ref = model.model(x, cond, positions=pos, attn_mask=mask)  # (B, n, V)
        for p in range(L):
            s = int(step[p])
            i = next(i for i, (pi, fi, _, _) in enumerate(slots) if pi == p - 1 and fi == s)
            assert (ref[:, i] - used[:, p]).abs().max() <= 1e-5, f"window {win}: position {p} (pass {s})"


def test_random_parallel_queries_see_the_interleaved_context():
    """Each query of a RandAR parallel step gets the random model's logits for
    the training-style sequence [cls, p, x, p, x, ..., p_query] of every token
    decoded in earlier steps (in decoding order) — nothing of its own step."""
    tok = pixel(3, 3)
    L = 9
    gen = generator("random-parallel", tok, steps=4)
    model = tiny_model(gen.model_spec(), seed=5)
    cond = torch.tensor([1, 0])
    out, rec = run(gen, model, cond, seed=4)
    used = rec.logits_by_position(L)
    order = torch.cat([p for _, p, _ in rec.calls], 1)  # (B, L) decoding order
    sizes = [p.shape[1] for _, p, _ in rec.calls]
    assert sizes == gen.step_sizes() and len(sizes) == 4
    first = 0
    for k in sizes:
        for t in range(first, first + k):
            for b in range(2):
                o = order[b : b + 1, :first]
                x = out[b : b + 1].gather(1, o)
                seq = [0]
                pos = [-1]
                for j in range(first):
                    seq += [tok.vocab_size, int(x[0, j])]
                    pos += [int(o[0, j])] * 2
                seq.append(tok.vocab_size)
                pos.append(int(order[b, t]))
                ref = model.model(torch.tensor([seq]), cond[b : b + 1], positions=torch.tensor([pos]))[0, -1]
                assert (ref - used[b, order[b, t]]).abs().max() <= 1e-5, (b, t)
        first += k


# ---------------------------------------------------------------------------
# KV cache == recomputation
# ---------------------------------------------------------------------------


class RecomputeCheck:
    """Wraps the instrumented model: every cached forward pass is compared
    with a from-scratch pass over everything fed to that cache so far, each
    earlier token under the mask it had when it was fed."""

    def __init__(self, model: InstrumentedModel):
        self.inner = model
        self.logs: dict[int, tuple] = {}
        self.checked = 0
        self.worst = 0.0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, inputs, cond=None, *, cache=None, positions=None, attn_mask=None, target_positions=None,
                 last_only=False, return_hidden=False):
        out = self.inner(inputs, cond, cache=cache, positions=positions, attn_mask=attn_mask,
                         target_positions=target_positions, last_only=last_only, return_hidden=return_hidden)
        if cache is None:
            return out
        R, T = inputs.shape[:2]
        start = cache.length - T
        S = start + T
        dev = inputs.device
        m = self.inner.model._mask(T, start, attn_mask, dev)
        if m is None:
            m = torch.ones(T, S, dtype=torch.bool, device=dev)
        elif isinstance(m, str):
            m = torch.ones(T, S, dtype=torch.bool, device=dev).tril(start)
        pos = torch.arange(start - 1, S - 1, device=dev) if positions is None else positions
        pos = pos.expand(R, T) if pos.dim() == 1 else pos
        entry = self.logs.setdefault(id(cache), (cache, cond, []))
        entry[2].append((inputs, pos, m))
        steps = entry[2]
        x = torch.cat([s[0] for s in steps], 1)
        p = torch.cat([s[1] for s in steps], 1)
        full = torch.zeros(S, S, dtype=torch.bool, device=dev)
        at = 0
        for _, _, mm in steps:
            full[at : at + mm.shape[0], : mm.shape[1]] = mm
            at += mm.shape[0]
        with torch.no_grad():
            ref = self.inner.model(x, entry[1], positions=p, attn_mask=full, return_hidden=return_hidden)
        outs = out if isinstance(out, tuple) else (out,)
        refs = ref if isinstance(ref, tuple) else (ref,)
        for o, r in zip(outs, refs):
            r = r[:, -1:] if last_only else r[:, -T:]
            self.worst = max(self.worst, (o - r).abs().max().item())
        self.checked += 1
        return out


@pytest.mark.parametrize("name", GRID_ORDERS + SCALE_ORDERS + ("depth-stack",))
@settings(max_examples=6, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_kv_cache_equals_recomputation(name, data):
    tok, cfg, _, _ = case(name, data)
    gen = generator(name, tok, **cfg)
    model = RecomputeCheck(tiny_model(gen.model_spec(), seed=3, pos=data.draw(st.sampled_from(["rope2d", "learned"]))))
    cond = torch.tensor([0, 1])
    out = gen.generate(model, Recorder(chain(data.draw(st.sampled_from(["plain", "cfg"])))), cond,
                       rng=RowRNG(0, torch.arange(2)))
    assert out.shape == (2, tok.layout.length)
    assert model.checked == gen.expected_nfe()
    assert model.worst <= 1e-5, f"{name} {cfg}: cached logits differ from recomputation by {model.worst:.3g}"


# ---------------------------------------------------------------------------
# shared models and degenerate cases that must equal a known order
# ---------------------------------------------------------------------------


def test_zipar_shares_the_raster_model():
    tok = pixel(3, 4)
    raster, zipar = generator("raster", tok), generator("zipar", tok, window=2)
    assert zipar.model_spec() == raster.model_spec()
    assert zipar.model_spec().key() == raster.model_spec().key()
    codes = torch.randint(0, tok.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    a, b = raster.training_batch(codes, torch.tensor([0, 1, 2])), zipar.training_batch(codes, torch.tensor([0, 1, 2]))
    for f in ("inputs", "targets", "loss_mask", "cond", "positions"):
        assert torch.equal(torch.as_tensor(getattr(a, f)).expand_as(torch.as_tensor(getattr(b, f))),
                           torch.as_tensor(getattr(b, f))), f


def test_random_parallel_shares_the_random_model():
    tok = pixel(2, 3, True)
    rand, par = generator("random", tok), generator("random-parallel", tok, steps=4)
    assert par.model_spec() == rand.model_spec()
    codes = torch.randint(0, tok.vocab_size, (2, tok.layout.length), generator=torch.Generator().manual_seed(0))
    with torch.random.fork_rng():
        torch.manual_seed(4)
        a = rand.training_batch(codes, torch.tensor([0, 1]))
    with torch.random.fork_rng():
        torch.manual_seed(4)
        b = par.training_batch(codes, torch.tensor([0, 1]))
    for f in ("inputs", "targets", "loss_mask", "cond", "positions"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


@pytest.mark.parametrize("kind", ["plain", "cfg"])
def test_zipar_with_a_full_row_window_is_raster_decoding(kind):
    tok = pixel(3, 3, True)
    raster, zipar = generator("raster", tok), generator("zipar", tok, window=tok.layout.grid[1] * 3)
    model = tiny_model(raster.model_spec(), seed=7)
    cond = torch.tensor([0, 1, 2])
    a, _ = run(raster, model, cond, seed=3, kind=kind)
    b, _ = run(zipar, model, cond, seed=3, kind=kind)
    assert zipar.expected_nfe() == tok.layout.length
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["plain", "cfg"])
def test_random_parallel_one_token_per_pass_is_random_decoding(kind):
    tok = pixel(2, 3)
    rand, par = generator("random", tok), generator("random-parallel", tok, steps=6)
    model = tiny_model(rand.model_spec(), seed=7)
    cond = torch.tensor([0, 1, 2])
    a, _ = run(rand, model, cond, seed=3, kind=kind)
    b, _ = run(par, model, cond, seed=3, kind=kind)
    assert torch.equal(a, b)


def test_par_with_one_region_is_raster():
    """PAR with n = 1: the same teacher-forcing batch as raster, and the same
    samples from the same weights."""
    tok = pixel(2, 4)
    raster, par = generator("raster", tok), generator("par", tok, regions=1)
    codes = torch.randint(0, tok.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    a, b = raster.training_batch(codes, torch.tensor([0, 1])), par.training_batch(codes, torch.tensor([0, 1]))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert torch.equal(a.positions[0], b.positions)
    model_r = tiny_model(raster.model_spec(), seed=4)
    model_p = tiny_model(par.model_spec(), seed=4)
    model_p.model.load_state_dict(model_r.model.state_dict())
    cond = torch.tensor([2, 0])
    assert torch.equal(run(raster, model_r, cond)[0], run(par, model_p, cond)[0])


def test_random_parallel_follows_the_cosine_schedule():
    from tokenloom.plugins.generators.random_parallel import (
        cosine_schedule,  # the plugin's own helper
    )

    sizes = cosine_schedule(64, 16)
    assert len(sizes) == 16 and sum(sizes) == 64 and sizes[0] == 1
    assert sizes == sorted(sizes), "few tokens early, more later"
    done = 0
    for s, k in enumerate(sizes[:-1]):  # after step s: int((1 - cos(pi/2 (s+1)/S)) L + 1) tokens (at least one more)
        done += k
        target = min(int((1 - math.cos(math.pi / 2 * (s + 2) / 16)) * 64 + 1), 64)
        assert sizes[s + 1] == min(max(target - done, 1), 64 - done)


def test_neighboring_has_one_head_per_direction():
    tok = pixel(3, 3)
    gen = generator("neighboring", tok)
    spec = gen.model_spec()
    assert spec.heads == (tok.vocab_size, tok.vocab_size)
    codes = torch.arange(9)[None] % tok.vocab_size
    batch = gen.training_batch(codes, torch.tensor([0]))
    # index 1 + (i*3 + j): the right head targets (i, j+1), the down head (i+1, j)
    assert batch.targets[0, 1 + 4, 0] == codes[0, 5] and batch.targets[0, 1 + 4, 1] == codes[0, 7]
    assert not batch.loss_mask[0, 1 + 2, 0] and batch.loss_mask[0, 1 + 2, 1]  # (0, 2): no right neighbour
    assert not batch.loss_mask[0, 1 + 8].any()  # the last token predicts nothing


# ---------------------------------------------------------------------------
# composition errors
# ---------------------------------------------------------------------------


class _MultiScale(tokenloom.Tokenizer):
    """A stand-in tokenizer with a multi-scale layout (nothing to encode)."""

    class Config:
        pass

    def __init__(self):
        super().__init__(None, image_shape=(3, 8, 8))
        self.layout = tokenloom.TokenLayout(scales=((1, 1), (2, 2), (4, 4)))
        self.vocab_size = 16


@pytest.mark.parametrize("name,config,tok,match", [
    ("next-block", {"rows": 3}, (4, 4, False), "rows = 3 does not divide"),
    ("next-cell", {"cell": 3}, (3, 4, False), "cell = 3 does not divide"),
    ("par", {"regions": 3}, (4, 4, False), "square number"),
    ("par", {"regions": 9}, (4, 3, False), "do not tile"),
    ("zipar", {"window": 5}, (2, 4, False), "larger than a row"),
    ("zipar", {"window": 13}, (2, 4, True), "larger than a row"),
    ("neighboring", {}, (2, 2, True), "residual depth"),
])
def test_composition_errors_are_config_errors(name, config, tok, match):
    with pytest.raises(tokenloom.ConfigError, match=match):
        generator(name, pixel(*tok), **config)


@pytest.mark.parametrize("name", ["next-block", "next-cell", "neighboring", "par", "zipar"])
def test_multi_scale_layouts_are_refused(name):
    with pytest.raises(tokenloom.ConfigError, match="single-scale"):
        REG.get("generator", name).cls(REG.get("generator", name).cls.Config(), tokenizer=_MultiScale())


@pytest.mark.parametrize("name,value", [("next-block", {"rows": 0}), ("zipar", {"window": 0}),
                                        ("random-parallel", {"steps": 1}), ("par", {"regions": 0})])
def test_bad_values_are_config_errors(name, value):
    with pytest.raises(tokenloom.ConfigError):
        generator(name, pixel(2, 2), **value)


@pytest.mark.parametrize("name", GRID_ORDERS + ("depth-stack",))
def test_known_is_refused_clearly(name):
    tok = pixel(2, 2)
    gen = generator(name, tok, **({"window": 1} if name == "zipar" else {}))
    model = tiny_model(gen.model_spec())
    known = tokenloom.Known(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(tokenloom.InputError, match="known"):
        gen.generate(model, SamplerChain(), torch.tensor([0]), rng=RowRNG(0, [0]), known=known)


# ---------------------------------------------------------------------------
# the conformance kit
# ---------------------------------------------------------------------------


def _kit_tok(gh, gw, depth3=False):
    return ("pixel", {"bits": 1, "pool": 2, "per_channel": depth3, "image_shape": (3, 2 * gh, 2 * gw)})


@pytest.mark.parametrize("name,config,tok", [
    ("next-block", {}, None),
    ("next-block", {"rows": 2}, _kit_tok(4, 3, True)),
    ("next-cell", {}, _kit_tok(4, 2)),
    ("next-cell", {"cell": 2}, _kit_tok(2, 4, True)),
    ("neighboring", {}, _kit_tok(3, 4)),
    ("par", {"regions": 1}, None),
    ("par", {}, _kit_tok(4, 2, True)),
    ("zipar", {"window": 1}, None),
    ("zipar", {}, _kit_tok(3, 4)),
    ("random-parallel", {}, None),
    ("random-parallel", {"steps": 3}, _kit_tok(3, 3, True)),
])
def test_conformance_kit(name, config, tok):
    tokenloom.testing.check("generator", name, tokenizer=tok, max_examples=6, **config)


# ---------------------------------------------------------------------------
# multi-scale orders: next-scale (VAR), next-scale-markov (HMAR), next-frequency (NFIG)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,tok", [("next-scale", lambda: multiscale((1, 2), codebook_size=2)),
                                      ("next-frequency", lambda: frequency(levels=1, channels=1, size=2, bins=3))])
def test_exact_likelihood_sums_to_one(name, tok):
    tok = tok()
    gen = generator(name, tok)
    L, V = tok.layout.length, tok.vocab_size
    model = tiny_model(gen.model_spec(), seed=3)
    every = torch.cartesian_prod(*[torch.arange(V)] * L).reshape(-1, L)
    for c in (0, 3):
        ll = gen.log_likelihood(model, every, torch.full((every.shape[0],), c))
        assert abs(torch.logsumexp(ll.double(), 0).item()) < 1e-4
        # and it is the product of the per-scale conditionals the decoder samples from
        tf = logits_of(model, gen.training_batch(every[:5], torch.full((5,), c)))[:, :, 0]
        ref = torch.log_softmax(tf, -1).gather(-1, every[:5, :, None])[..., 0].sum(-1)
        assert torch.allclose(ll[:5], ref, atol=1e-5)


def test_next_scale_inputs_are_the_tokenizers_scale_inputs():
    tok = multiscale((1, 2, 4))
    gen = generator("next-scale", tok)
    codes = torch.randint(0, 8, (2, tok.layout.length), generator=torch.Generator().manual_seed(0))
    batch = gen.training_batch(codes, torch.tensor([0, 1]))
    assert batch.inputs.shape == (2, 21, 4) and gen.model_spec().input_kind == "embeddings"
    assert torch.equal(batch.inputs[:, 1:], tok.scale_inputs(codes))  # VAR's f̂ of the earlier scales
    assert torch.equal(batch.inputs[:, :1], torch.zeros(2, 1, 4))  # the start slot (class embedding)
    assert gen.model_spec().option("block_sizes") == (1, 4, 16)


def test_next_frequency_inputs_are_the_coarser_bands_image():
    tok = frequency(levels=2, channels=3, size=4)
    gen = generator("next-frequency", tok)
    img = tokenloom.testing.random_images(2, (3, 4, 4), seed=1)
    codes = tok.encode(img)
    x = gen.training_batch(codes, torch.tensor([0, 1])).inputs  # (B, L, 3)
    # band 1 (LH_2, 1×1) sees the LL_2 band alone: the block mean of the quantised image
    partial = codes.clone()
    partial[:, 1:] = gen.zero
    assert torch.allclose(x[:, 1], tok.decode(partial).mean((2, 3)), atol=1e-6)
    # the last band (HH_1, 2×2) sees everything before it, downsampled to 2×2
    sl = tok.layout.scale_slices()[-1]
    partial = codes.clone()
    partial[:, sl] = gen.zero
    ref = torch.nn.functional.avg_pool2d(tok.decode(partial), 2).flatten(2).transpose(1, 2)
    assert torch.allclose(x[:, sl], ref, atol=1e-6)


def test_next_scale_inpainting_teacher_forces_known_codes():
    tok = multiscale((1, 2, 4))
    gen = generator("next-scale", tok)
    model = tiny_model(gen.model_spec(), seed=2)
    L = tok.layout.length
    known_codes = torch.randint(0, 8, (2, L), generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(2, L, dtype=torch.bool)
    mask[:, :5] = True  # scales 1 and 2 given
    mask[0, 5:9] = True
    out = gen.generate(model, SamplerChain(), torch.tensor([0, 1]), rng=RowRNG(0, torch.arange(2)),
                       known=tokenloom.Known(known_codes, mask))
    assert torch.equal(out[mask], known_codes[mask])
    # every scale after the given ones was predicted from inputs built on the known codes, and the
    # cached passes still equal recomputation
    x = gen.training_batch(out, torch.tensor([0, 1])).inputs
    assert torch.equal(x[:, 5:], tok.scale_inputs(out)[:, 4:])
    rec = RecomputeCheck(model)
    gen.generate(rec, SamplerChain(), torch.tensor([0, 1]), rng=RowRNG(0, torch.arange(2)),
                 known=tokenloom.Known(known_codes, mask))
    assert rec.worst <= 1e-5


def test_next_scale_markov_is_block_diagonal_and_masked():
    tok = multiscale((1, 2, 4))
    gen = generator("next-scale-markov", tok, steps=3, mask_head=False)  # one head: every row masked
    spec = gen.model_spec()
    assert spec.input_dim == 4 + 4 + 1 and spec.attention == "custom" and spec.seq_len == 22
    model = tiny_model(spec, seed=1)
    codes = torch.randint(0, 8, (3, 21), generator=torch.Generator().manual_seed(0))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        batch = gen.training_batch(codes, torch.tensor([0, 1, 2]))
    hidden = batch.loss_mask[:, 1:]
    sl = tok.layout.scale_slices()
    for s in sl:  # at least one hidden token per scale and image; revealed ones carry their code
        assert hidden[:, s].any(1).all()
    flag = batch.inputs[:, 1:, -1]
    assert torch.equal(flag.bool(), ~hidden)
    emb = tok.code_embeddings()[codes]
    assert torch.allclose(batch.inputs[:, 1:, 4:8], emb * (~hidden)[..., None])
    ref = logits_of(model, batch)
    # Markov: changing everything in scale 0 and 2's inputs leaves scale 1's logits unchanged
    other = batch.inputs.clone()
    other[:, 1 + sl[0].start : 1 + sl[0].stop] += 1.0
    other[:, 1 + sl[2].start :] -= 1.0
    batch.inputs = other
    new = logits_of(model, batch)
    assert (new - ref)[:, 1 + sl[1].start : 1 + sl[1].stop].abs().max() <= 1e-5
    assert (new - ref)[:, 1 + sl[2].start :].abs().max() > 1e-4
    assert gen.expected_nfe() == 1 + 3 + 3


def test_next_scale_markov_steps_change_without_retraining():
    tok = multiscale((1, 2, 4))
    model = tiny_model(generator("next-scale-markov", tok).model_spec(), seed=4)
    for steps, nfe in ((1, 3), (2, 5), (4, 9), (16, 21)):
        gen = generator("next-scale-markov", tok, steps=steps)
        assert gen.model_spec() == generator("next-scale-markov", tok).model_spec()  # same model
        model.reset()
        out = gen.generate(model, SamplerChain(chain("cfg")), torch.tensor([0, 1]), rng=RowRNG(1, torch.arange(2)))
        assert model.nfe == nfe and out.shape == (2, 21)


@pytest.mark.parametrize("name", ["next-scale", "next-scale-markov", "next-frequency"])
def test_multi_scale_orders_refuse_a_single_scale_tokenizer(name):
    with pytest.raises(tokenloom.ConfigError, match="single scale"):
        generator(name, pixel(2, 2))


def test_next_frequency_needs_a_zero_code():
    with pytest.raises(tokenloom.ConfigError, match="zero code"):
        generator("next-frequency", frequency(bins=4))
    with pytest.raises(tokenloom.ConfigError, match="zero code"):
        generator("next-frequency", multiscale((1, 2, 4)))


@pytest.mark.parametrize("name", ["next-scale-markov", "next-frequency"])
def test_scale_orders_refuse_known_clearly(name):
    tok = multiscale((1, 2)) if name == "next-scale-markov" else frequency(levels=1, size=2)
    gen = generator(name, tok)
    L = tok.layout.length
    known = tokenloom.Known(torch.zeros(1, L, dtype=torch.long), torch.ones(1, L, dtype=torch.bool))
    with pytest.raises(tokenloom.InputError, match="known"):
        gen.generate(tiny_model(gen.model_spec()), SamplerChain(), torch.tensor([0]), rng=RowRNG(0, [0]), known=known)


_MS = ("multiscale", {"scales": (1, 2, 4), "downsample": 2, "image_shape": (3, 8, 8), "codebook_size": 8,
                      "code_dim": 4})


@pytest.mark.parametrize("name,config,tok", [
    ("next-scale", {}, _MS),
    ("next-scale-markov", {"steps": 2}, _MS),
    ("next-frequency", {}, ("frequency", {"levels": 2, "drop_levels": 0, "bins": 3, "image_shape": (3, 4, 4)})),
])
def test_conformance_kit_multi_scale(name, config, tok):
    tokenloom.testing.check("generator", name, tokenizer=tok, max_examples=4, **config)


# ---------------------------------------------------------------------------
# depth-stack (RQ-Transformer)
# ---------------------------------------------------------------------------


def test_depth_stack_exact_likelihood_sums_to_one_over_stacks():
    tok = build_component(REG, "tokenizer", "pixel", {"bits": 1, "per_channel": True, "image_shape": (3, 1, 2)},
                          path="tokenizer")  # 2 positions × depth 3, V = 2: 64 sequences
    gen = generator("depth-stack", tok)
    model = tiny_model(gen.model_spec(), seed=2)
    every = torch.cartesian_prod(*[torch.arange(2)] * 6)
    for c in (1, 3):
        ll = gen.log_likelihood(model, every, torch.full((64,), c))
        assert abs(torch.logsumexp(ll.double(), 0).item()) < 1e-4


def test_depth_stack_spatial_input_is_the_summed_stack_and_heads_are_per_depth():
    tok = pixel(2, 2, True)
    gen = generator("depth-stack", tok)
    spec = gen.model_spec()
    assert spec.heads == (tok.vocab_size,) * 3 and spec.seq_len == 5 and spec.option("depth_head") == 2
    model = tiny_model(spec, seed=0)
    codes = torch.randint(0, 2, (2, 12), generator=torch.Generator().manual_seed(1))
    batch = gen.training_batch(codes, torch.tensor([0, 1]))
    assert batch.inputs.shape == (2, 5, 3) and torch.equal(batch.inputs[:, 1:], codes.view(2, 4, 3))
    # the spatial input is order-free within a stack: permuting a stack's codes leaves the hidden states equal
    perm = batch.inputs.clone()
    perm[:, 2] = perm[:, 2].flip(-1)
    h1 = model.model(batch.inputs, batch.cond, positions=batch.positions, return_hidden=True)
    h2 = model.model(perm, batch.cond, positions=batch.positions, return_hidden=True)
    assert torch.allclose(h1, h2, atol=1e-6)
    # one backbone pass per position, D depth-head steps each
    model.reset()
    gen.generate(model, SamplerChain(), torch.tensor([0, 2]), rng=RowRNG(0, torch.arange(2)))
    assert model.nfe == 4 and model.depth_steps == 12


def test_depth_stack_refuses_multi_scale_layouts():
    with pytest.raises(tokenloom.ConfigError, match="single-scale"):
        REG.get("generator", "depth-stack").cls(REG.get("generator", "depth-stack").cls.Config(),
                                                tokenizer=_MultiScale())


@pytest.mark.parametrize("tok", [None, ("rq", {"depth": 3, "codebook_size": 8, "code_dim": 4, "downsample": 4,
                                               "image_shape": (3, 8, 8)})])
def test_conformance_kit_depth_stack(tok):
    tokenloom.testing.check("generator", "depth-stack", tokenizer=tok, max_examples=6)


def test_orders_skipped_by_the_generic_kit_run_are_covered_here():
    """tests/test_generators.py runs the kit on every generator with its
    defaults over random pixel layouts, except the orders listed in its
    KIT_IN_TEST_ORDERS: each of them must refuse some such layout with a
    ConfigError (that is why it is skipped there) and have a kit case here."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_tg", Path(__file__).with_name("test_generators.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    kit_cases = {case[0] for test in (test_conformance_kit, test_conformance_kit_multi_scale)
                 for mark in test.pytestmark for case in mark.args[1]} | {"depth-stack"}
    assert mod.KIT_IN_TEST_ORDERS <= kit_cases, mod.KIT_IN_TEST_ORDERS - kit_cases
    for name in mod.KIT_IN_TEST_ORDERS:
        refused = False
        for gh, gw, depth3 in [(1, 1, False), (3, 3, False), (1, 4, False), (2, 2, True), (3, 1, True)]:
            try:
                generator(name, pixel(gh, gw, depth3))
            except tokenloom.ConfigError:
                refused = True
        assert refused, f"{name} accepts every pixel layout with its defaults: run it in the generic kit test"


def test_multi_scale_orders_name_what_their_tokenizer_lacks():
    from tokenloom.orders import scales_of

    pixel = tokenloom.create("tokenizer", "pixel", bits=1, image_shape=(3, 4, 4))
    for name in ("next-scale", "next-scale-markov"):
        with pytest.raises(tokenloom.ConfigError, match=f"{name} needs a multi-scale tokenizer"):
            tokenloom.create("generator", name, tokenizer=pixel)
    haar = tokenloom.create("tokenizer", "frequency", image_shape=(3, 8, 8))  # several bands, no VAR inputs
    with pytest.raises(tokenloom.ConfigError, match="teacher-forcing inputs"):
        scales_of(haar, "next-scale", inputs=True)
    assert scales_of(haar, "next-frequency").n_scales == haar.layout.n_scales
