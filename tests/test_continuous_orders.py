"""Continuous tokens in the orders that support both kinds (issue 17 item 3):
``masked`` with MAR's settings (``style = "mar"``), ``next-scale`` (FlowAR)
and ``next-cell`` (xAR) — one plugin each. The token-kind independent parts
(MAR's mask ratio and schedule, the teacher-forcing batches with float
targets, the flag channels) are checked here on a tiny test tokenizer; the
discrete paths keep their specs (cache keys) and behaviour."""

from __future__ import annotations

import math

import attrs
import pytest
import torch

import tokenloom
import tokenloom.testing
from tokenloom.backbone.instrumented import InstrumentedModel
from tokenloom.config import ModelConfig
from tokenloom.model import build_model
from tokenloom.plugins.generators import masked as gen_masked
from tokenloom.rng import RowRNG
from tokenloom.sampling import SamplerChain


class Latents(tokenloom.Tokenizer):
    """A test tokenizer of continuous tokens: each scale's grid holds the
    image area-averaged to it (D = channels); ``scale_inputs`` is the
    previous scale upsampled (nearest) to the next grid (FlowAR's inputs)."""

    continuous = True

    @attrs.frozen
    class Config:
        scales: tuple = ((2, 2),)

    def __init__(self, config, *, image_shape):
        super().__init__(config, image_shape=image_shape)
        self.layout = tokenloom.TokenLayout(scales=config.scales, residual=False)
        self.token_dim = image_shape[0]
        self.embed_dim = image_shape[0]
        self.vocab_size = 0

    def encode(self, images):
        images = tokenloom.check_images(images, self.image_shape)
        out = [torch.nn.functional.adaptive_avg_pool2d(images, s).flatten(2).transpose(1, 2)
               for s in self.layout.scales]
        return torch.cat(out, 1)

    def decode(self, latents):
        latents = self.check_latents(latents)
        h, w = self.layout.scales[-1]
        last = latents[:, -h * w:].transpose(1, 2).reshape(latents.shape[0], -1, h, w)
        return torch.nn.functional.interpolate(last, size=self.image_shape[1:]).clamp(-1, 1)

    def code_embeddings(self):
        raise tokenloom.ConfigError("continuous tokens have no code embeddings")

    def scale_inputs(self, latents):
        B, D = latents.shape[0], self.token_dim
        sl = self.layout.scale_slices()
        out = []
        for k in range(1, self.layout.n_scales):
            (h0, w0), (h, w) = self.layout.scales[k - 1], self.layout.scales[k]
            prev = latents[:, sl[k - 1]].transpose(1, 2).reshape(B, D, h0, w0)
            out.append(torch.nn.functional.interpolate(prev, size=(h, w)).flatten(2).transpose(1, 2))
        return torch.cat(out, 1)


def latents_tok(scales=((2, 2),), channels: int = 3):
    return Latents(Latents.Config(scales=scales), image_shape=(channels, 4, 4))


def codes_tok(gh: int = 2, gw: int = 2):
    return tokenloom.create("tokenizer", "pixel", bits=1, pool=2, image_shape=(3, 2 * gh, 2 * gw))


def tiny(gen, seed: int = 0) -> InstrumentedModel:
    return InstrumentedModel(build_model(gen.model_spec(), ModelConfig(n_layer=2, d_model=16, n_head=2),
                                         n_classes=3, seed=seed).eval())


class Spy(InstrumentedModel):
    def __init__(self, model):
        super().__init__(model.model)
        self.calls = []

    def __call__(self, inputs, cond=None, **kw):
        self.calls.append(inputs.clone())
        return super().__call__(inputs, cond, **kw)


# -- MAR's settings, token-kind independent ------------------------------------------------------


def test_mar_mask_ratio_is_the_truncated_normal_of_the_reference():
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([gen_masked.mar_mask_ratio(0.7, g) for _ in range(4000)])
    assert float(draws.min()) >= 0.7 and float(draws.max()) <= 1.0
    # mean of N(1, 0.25²) truncated to [0.7, 1]: 1 + σ(φ(a) − φ(0)) / (Φ(0) − Φ(a)), a = −1.2
    a = -1.2
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
    mean = 1 + 0.25 * (phi(a) - phi(0)) / (cdf(0) - cdf(a))
    assert abs(float(draws.mean()) - mean) < 0.005
    assert gen_masked.mar_mask_ratio(1.0, g) == 1.0  # min 1: always fully masked


@pytest.mark.parametrize("L,T", [(4, 3), (16, 8), (64, 64), (5, 10)])
def test_mar_schedule_finalises_every_token_once_and_ramps_guidance_over_decoded_tokens(L, T):
    gen = tokenloom.create("generator", "masked", steps=T, style="mar", tokenizer=codes_tok(1, L))
    sched = gen.mar_schedule()
    assert len(sched) == T
    left, prev = L, None
    for t, (m, fraction) in enumerate(sched):
        assert fraction == (L - m) / L  # MAR: cfg_iter = 1 + (cfg − 1)·(L − mask_len)/L
        if t < T - 1:
            assert 1 <= m <= max(1, left - 1) and m == max(1, min(left - 1, math.floor(L * math.cos(
                math.pi / 2 * (t + 1) / T))))
            left = m
        if prev is not None:
            assert fraction >= prev  # the guidance only grows
        prev = fraction


def test_mar_style_on_codes_decodes_each_token_once_along_a_random_order_with_T_passes():
    t = codes_tok(2, 3)
    gen = tokenloom.create("generator", "masked", steps=4, style="mar", tokenizer=t)
    assert gen.model_spec().train_order == "masked-mar"
    spy = Spy(tiny(gen))
    out = gen.generate(spy, SamplerChain(), torch.tensor([0, 1, 2]), rng=RowRNG(0, [0, 1, 2]))
    L, V = t.layout.length, t.vocab_size
    assert len(spy.calls) == 4 == gen.expected_nfe()
    assert out.shape == (3, L) and int(out.min()) >= 0 and int(out.max()) < V
    masked_per_pass = [(c[:, 1:] == V).sum(1).tolist() for c in spy.calls]
    want = [L] + [m for m, _ in gen.mar_schedule()[:-1]]
    assert masked_per_pass == [[m] * 3 for m in want]
    for a, b in zip(spy.calls, spy.calls[1:]):  # a token once final stays final
        fixed = a[:, 1:] != V
        assert torch.equal(a[:, 1:][fixed], b[:, 1:][fixed])
    first_revealed = [(spy.calls[1][i, 1:] != V).nonzero().flatten().tolist() for i in range(3)]
    assert len({tuple(r) for r in first_revealed}) > 1  # each image has its own random order
    alone = gen.generate(tiny(gen), SamplerChain(), torch.tensor([1]), rng=RowRNG(0, [1]))
    assert torch.equal(alone[0], out[1])  # image i depends only on (seed, i)


def test_mar_style_on_codes_passes_the_generator_kit():
    tokenloom.testing.check("generator", "masked", max_examples=3, style="mar", steps=3)


def test_mar_inpainting_keeps_known_codes_and_never_masks_them():
    t = codes_tok(2, 2)
    gen = tokenloom.create("generator", "masked", steps=3, style="mar", tokenizer=t)
    L = t.layout.length
    known_codes = torch.randint(0, t.vocab_size, (2, L), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, L, dtype=torch.bool)
    mask[0, :3] = True
    mask[1, 1] = True
    spy = Spy(tiny(gen))
    out = gen.generate(spy, SamplerChain(), torch.tensor([0, 1]), rng=RowRNG(0, [0, 1]),
                       known=tokenloom.Known(codes=known_codes, mask=mask))
    assert torch.equal(out[mask], known_codes[mask])
    for c in spy.calls:
        assert not (c[:, 1:][mask] == t.vocab_size).any()


def test_maskgit_discrete_spec_and_training_are_unchanged():
    gen = tokenloom.create("generator", "masked", tokenizer=codes_tok())
    spec = gen.model_spec()
    assert gen.style == "maskgit" and spec.train_order == "masked" and spec.input_kind == "tokens"
    assert "token_dim" not in spec.key()  # the discrete model cache key as before continuous tokens
    codes = torch.randint(0, 8, (4, 4), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    batch = gen.training_batch(codes, torch.zeros(4, dtype=torch.long))
    torch.manual_seed(3)  # the MaskGIT recipe: r ~ U(0, 1) per image, then a random rank per position
    r = torch.rand(4)
    n = torch.ceil(torch.cos(math.pi / 2 * r) * 4).clamp(1, 4).long()
    rank = torch.rand(4, 4).argsort(-1).argsort(-1)
    assert torch.equal(batch.loss_mask[:, 1:], rank < n[:, None])


# -- continuous training batches -----------------------------------------------------------------


def test_masked_continuous_batch_zeroes_masked_latents_and_flags_them():
    t = latents_tok(((2, 3),))
    gen = tokenloom.create("generator", "masked", tokenizer=t)
    assert gen.style == "mar"  # auto: MAR for continuous tokens
    spec = gen.model_spec()
    assert (spec.token_dim, spec.heads, spec.input_kind, spec.input_dim) == (3, (), "embeddings", 4)
    assert spec.attention == "bidirectional" and spec.train_order == "masked-mar"
    x = torch.randn(5, 6, 3)
    torch.manual_seed(0)
    b = gen.training_batch(x, torch.zeros(5, dtype=torch.long))
    assert b.inputs.shape == (5, 7, 4) and b.targets.shape == (5, 7, 3) and b.targets.dtype == torch.float32
    mask = b.loss_mask[:, 1:]
    assert not b.loss_mask[:, 0].any() and torch.equal(b.inputs[:, 1:, 3] == 1, mask)
    assert torch.equal(b.targets[:, 1:], x)
    assert (b.inputs[:, 1:, :3][mask] == 0).all() and torch.equal(b.inputs[:, 1:, :3][~mask], x[~mask])
    counts = mask.sum(1)
    assert (counts == counts[0]).all() and int(counts[0]) >= math.ceil(0.7 * 6)  # one MAR ratio per batch


def test_next_cell_continuous_batch_start_flag_targets_and_noisy_context():
    t = latents_tok(((4, 4),), channels=2)
    gen = tokenloom.create("generator", "next-cell", cell=2, tokenizer=t)
    spec = gen.model_spec()
    assert (spec.token_dim, spec.input_dim, spec.heads) == (2, 3, ())
    x = torch.randn(2, 16, 2)
    b = gen.training_batch(x, torch.zeros(2, dtype=torch.long))
    assert b.inputs.shape == (2, 17, 3) and b.targets.shape == (2, 17, 2)
    assert (b.inputs[:, 1:5, 2] == 1).all() and (b.inputs[:, 1:5, :2] == 0).all()  # START block
    assert (b.inputs[:, 5:, 2] == 0).all()
    order = gen.groups.order
    assert torch.equal(b.targets[:, 1:], x[:, order]) and torch.equal(b.inputs[:, 5:, :2], x[:, order[:12]])
    noisy = tokenloom.create("generator", "next-cell", cell=2, noisy_context=True, tokenizer=t)
    assert noisy.model_spec() != spec  # a different recipe trains a model of its own
    torch.manual_seed(0)
    nb = noisy.training_batch(x, torch.zeros(2, dtype=torch.long))
    torch.manual_seed(0)
    again = noisy.training_batch(x, torch.zeros(2, dtype=torch.long))
    assert torch.equal(nb.inputs, again.inputs)  # drawn from torch's (trainer-seeded) generator
    assert torch.equal(nb.targets, b.targets) and torch.equal(nb.inputs[:, :5], b.inputs[:, :5])
    assert not torch.allclose(nb.inputs[:, 5:, :2], b.inputs[:, 5:, :2])
    # each context cell of each image is t·x + (1 − t)·ε at its own t: the residual against x is
    # a per-cell multiple of noise, so cells differ in how far they moved
    moved = (nb.inputs[:, 5:, :2] - b.inputs[:, 5:, :2]).reshape(2, 3, 4, 2).abs().mean((2, 3))
    assert moved.unique().numel() == 6


def test_next_scale_continuous_batch_uses_scale_inputs_and_float_targets():
    t = latents_tok(((1, 1), (2, 2), (4, 4)))
    gen = tokenloom.create("generator", "next-scale", tokenizer=t)
    spec = gen.model_spec()
    assert (spec.token_dim, spec.heads, spec.input_dim, spec.option("block_sizes")) == (3, (), 3, (1, 4, 16))
    assert gen.exact_likelihood is False and gen.expected_nfe() == 3
    x = torch.randn(2, 21, 3)
    b = gen.training_batch(x, torch.zeros(2, dtype=torch.long))
    assert torch.equal(b.targets, x) and b.loss_mask.all()
    assert (b.inputs[:, :1] == 0).all() and torch.equal(b.inputs[:, 1:], t.scale_inputs(x))
    with pytest.raises(tokenloom.ConfigError, match="no exact likelihood"):
        gen.log_likelihood(None, x, torch.zeros(2, dtype=torch.long))


# -- bad input and composition errors --------------------------------------------------------------


def test_bad_compositions_and_bad_latents_are_readable_errors():
    with pytest.raises(tokenloom.ConfigError, match="maskgit"):
        tokenloom.create("generator", "masked", style="maskgit", tokenizer=latents_tok())
    with pytest.raises(tokenloom.ConfigError, match="'kl' with scales"):
        tokenloom.create("generator", "next-scale", tokenizer=latents_tok())
    with pytest.raises(tokenloom.ConfigError, match="noisy_context"):
        tokenloom.create("generator", "next-cell", noisy_context=True, tokenizer=codes_tok())
    gens = [tokenloom.create("generator", "masked", tokenizer=latents_tok()),
            tokenloom.create("generator", "next-cell", cell=1, tokenizer=latents_tok()),
            tokenloom.create("generator", "next-scale", tokenizer=latents_tok(((1, 1), (2, 2))))]
    cond = torch.zeros(1, dtype=torch.long)
    for gen in gens:
        L = gen.tokenizer.layout.length
        bad = torch.zeros(1, L, 3)
        bad[0, 0, 0] = float("nan")
        with pytest.raises(tokenloom.InputError, match="latents"):
            gen.training_batch(bad, cond)
        with pytest.raises(tokenloom.InputError):
            gen.training_batch(torch.zeros(1, L, 5), cond)  # wrong latent width
        with pytest.raises(tokenloom.InputError, match="continuous"):
            gen.training_batch(torch.zeros(1, L, dtype=torch.long), cond)  # codes to a continuous order


# -- continuous decoding with a head --------------------------------------------------------------

CONTINUOUS = [("masked", {"steps": 3}, ((2, 3),)), ("next-cell", {"cell": 2}, ((4, 4),)),
              ("next-scale", {}, ((1, 1), (2, 2), (4, 4)))]


def tiny_continuous(gen, head: str = "flow", seed: int = 0, **options) -> InstrumentedModel:
    spec = gen.model_spec()
    options = {"width": 16, "depth": 1, **options}
    built = tokenloom.create("head", head, hidden_dim=16, token_dim=spec.token_dim, **options)
    model = build_model(spec, ModelConfig(n_layer=2, d_model=16, n_head=2), n_classes=3, seed=seed, head=built)
    return InstrumentedModel(model.eval())


class GuidanceSpy(InstrumentedModel):
    """Records the guidance and temperature the head is asked to sample with, and the tokens drawn."""

    def __init__(self, model):
        super().__init__(model.model)
        self.asked = []
        self.rows = 0

    def __call__(self, inputs, cond=None, **kw):
        self.rows += inputs.shape[0]
        return super().__call__(inputs, cond, **kw)

    def sample_head(self, hidden, **kw):
        self.asked.append((kw["guidance"], kw["temperature"], hidden.shape[:-1], kw["uncond"] is not None))
        return super().sample_head(hidden, **kw)


@pytest.mark.parametrize("name,options,scales", CONTINUOUS, ids=lambda v: str(v))
def test_continuous_decoding_nfe_is_backbone_passes_and_every_token_is_drawn_once(name, options, scales):
    gen = tokenloom.create("generator", name, tokenizer=latents_tok(scales), **options)
    model = tiny_continuous(gen, steps=2)
    out = gen.generate(model, SamplerChain(), torch.tensor([0, 1, 2]), rng=RowRNG(0, [0, 1, 2]))
    L = gen.tokenizer.layout.length
    assert out.shape == (3, L, 3) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert model.nfe == gen.expected_nfe()  # NFE: backbone passes only
    assert model.head_tokens == 3 * L  # each position drawn by the head exactly once
    assert model.head_steps == 2 * gen.expected_nfe()  # 2 Euler steps per draw, one draw per pass
    decoded = gen.tokenizer.decode(out)
    assert decoded.shape == (3, 3, 4, 4)
    again = tiny_continuous(gen, steps=2)
    alone = gen.generate(again, SamplerChain(), torch.tensor([2]), rng=RowRNG(0, [2]))
    assert torch.allclose(alone[0], out[2], atol=1e-5)  # image i depends only on (seed, i)
    other = gen.generate(tiny_continuous(gen, steps=2), SamplerChain(), torch.tensor([2]), rng=RowRNG(1, [2]))
    assert not torch.allclose(other[0], out[2])


@pytest.mark.parametrize("name,options,scales", CONTINUOUS, ids=lambda v: str(v))
def test_continuous_guidance_runs_null_rows_in_the_same_pass_and_follows_the_schedule(name, options, scales):
    gen = tokenloom.create("generator", name, tokenizer=latents_tok(scales), **options)
    spy = GuidanceSpy(tiny_continuous(gen, steps=2))
    chain = SamplerChain([tokenloom.create("sampler", "cfg", scale=3.0, schedule="linear"),
                          tokenloom.create("sampler", "temperature", t=0.5)])
    gen.generate(spy, chain, torch.tensor([0, 1]), rng=RowRNG(0, [0, 1]))
    assert spy.nfe == gen.expected_nfe() and spy.rows == 4 * gen.expected_nfe()  # null rows in every pass
    guidance = [g for g, _, _, _ in spy.asked]
    assert all(t == 0.5 for _, t, _, _ in spy.asked)
    if name == "masked":  # MAR: 1 + (s − 1)·(L − m_t)/L over the decoded tokens
        want = [1 + 2.0 * f for _, f in gen.mar_schedule()]
    else:  # one step per cell / scale: 1 + (s − 1)·t/(n − 1)
        n = gen.expected_nfe()
        want = [1 + 2.0 * t / (n - 1) for t in range(n)]
    assert guidance == pytest.approx(want)
    assert all(u == (g != 1.0) for g, _, _, u in spy.asked)  # the null rows' states reach the head


def test_mar_continuous_decodes_the_cosine_schedule_along_a_random_order_and_keeps_known_latents():
    t = latents_tok(((3, 3),))
    gen = tokenloom.create("generator", "masked", steps=4, tokenizer=t)
    spy = Spy(tiny_continuous(gen, head="diffusion", sampling_steps=3, num_timesteps=20))
    known = torch.randn(2, 9, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, :4] = True
    out = gen.generate(spy, SamplerChain(), torch.tensor([0, 1]), rng=RowRNG(0, [0, 1]),
                       known=tokenloom.Known(codes=known, mask=mask))
    assert torch.equal(out[mask], known[mask])
    flags = [c[:, 1:, 3] for c in spy.calls]  # the mask flag channel of each pass
    assert [f[1].sum().item() for f in flags] == [9] + [m for m, _ in gen.mar_schedule()[:-1]]
    assert not any(f[0][:4].any() for f in flags)  # known latents are never masked
    assert all(torch.equal(c[0, 1:5, :3], known[0, :4]) for c in spy.calls)
    n0 = [f[0].sum().item() for f in flags]
    assert n0[0] == 5 and n0 == sorted(n0, reverse=True) and n0[-1] >= 1
    with pytest.raises(tokenloom.InputError, match="known.codes"):
        gen.generate(spy, SamplerChain(), torch.tensor([0]), rng=RowRNG(0, [0]),
                     known=tokenloom.Known(codes=torch.zeros(1, 9, dtype=torch.long),
                                           mask=torch.zeros(1, 9, dtype=torch.bool)))


# -- end to end: tokenloom run on tiny shapes configs ----------------------------------------------

RUN_TOML = """
seed = 0
[data]
name = "shapes"
size = 8
n = 64
n_holdout = 16
[tokenizer]
name = "kl"
token_dim = 2
downsample = 2
channels = 8
steps = 4
{scales}
[generator]
name = "{generator}"
{generator_extra}
[head]
{head}
[model]
n_layer = 1
d_model = 16
n_head = 2
[train]
steps = 3
batch_size = 8
warmup = 1
[[sampler]]
name = "cfg"
scale = 2.0
schedule = "linear"
[metrics]
names = ["nll", "cost"]
n_samples = 4
"""

RUNS = [
    # MAR: masked with MAR's settings and the diffusion head; NFE = steps
    ("masked", 'style = "mar"\nsteps = 3', 'name = "diffusion"\nwidth = 16\ndepth = 1\nsampling_steps = 4', "", 3, 4),
    # FlowAR: next-scale on kl's multi-scale layout with the flow head; NFE = scales
    ("next-scale", "", 'name = "flow"\nwidth = 16\ndepth = 1\nsteps = 2', "scales = [1, 2, 4]", 3, 2),
    # xAR: next-cell with the flow head and noisy context; NFE = cells = (4/2)²
    ("next-cell", "cell = 2\nnoisy_context = true", 'name = "flow"\nwidth = 16\ndepth = 1\nsteps = 2', "", 4, 2),
]


@pytest.mark.parametrize("generator,extra,head,scales,nfe,steps", RUNS, ids=[r[0] for r in RUNS])
def test_tokenloom_run_trains_and_samples_each_continuous_order(tmp_path, generator, extra, head, scales, nfe,
                                                                steps):
    from tokenloom.config import load_config
    from tokenloom.pipeline import run

    path = tmp_path / "run.toml"
    path.write_text(RUN_TOML.format(generator=generator, generator_extra=extra, head=head, scales=scales))
    rec = run(load_config(path), tmp_path / "out", progress=False)
    m = rec["metrics"]
    assert m["nfe"] == nfe  # backbone passes only: the order's formula
    assert m["nll_bits_per_image"] is None  # no exact likelihood with a diffusion/flow head
    assert m["head_steps"] == nfe * steps  # head steps counted apart: one draw per pass
    assert (tmp_path / "out" / rec["artifacts"]["samples"]).is_file()


def test_options_added_for_continuous_tokens_leave_discrete_cache_keys_as_before():
    from tokenloom.running.cache import component_key

    def key(name, **options):
        gen = tokenloom.create("generator", name, tokenizer=codes_tok(), **options)
        return component_key(type("C", (), {"name": name, "config": gen.config}))

    assert key("masked") == {"name": "masked", "config": {"steps": 8, "choice_temperature": 4.5}}
    assert key("next-cell") == {"name": "next-cell", "config": {"cell": 2}}
    assert key("masked", style="mar")["config"]["style"] == "mar"  # a chosen option is part of the key
    assert key("masked", mask_ratio_min=0.5)["config"]["mask_ratio_min"] == 0.5


def test_mar_inpainting_image_depends_only_on_itself_when_rows_finalise_different_counts():
    t = latents_tok(((3, 3),))
    gen = tokenloom.create("generator", "masked", steps=3, tokenizer=t)
    known = torch.randn(2, 9, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, :6] = True  # row 1 has 3 unknown tokens, row 0 all 9: padded draws in the batch
    both = gen.generate(tiny_continuous(gen, steps=2), SamplerChain(), torch.tensor([0, 1]),
                        rng=RowRNG(0, [0, 1]), known=tokenloom.Known(codes=known, mask=mask))
    alone = gen.generate(tiny_continuous(gen, steps=2), SamplerChain(), torch.tensor([0]), rng=RowRNG(0, [0]),
                         known=tokenloom.Known(codes=known[:1], mask=mask[:1]))
    assert torch.allclose(alone[0], both[0], atol=1e-5)
    assert torch.equal(both[1, :6], known[1, :6])
