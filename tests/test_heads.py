"""Heads (issue 17): the conformance kit on the built-ins and on a third-party head, the details
kept from MAR's diffusion loss and FlowAR's flow matching, the per-image noise, the composition
errors, the backbone/trainer integration and the raster order's continuous path end to end."""

from __future__ import annotations

import math

import attrs
import numpy as np
import pytest
import torch
from conformance_pkg.mog_head import PLUGIN, MixtureOfGaussians

import tokenloom
import tokenloom.testing
from tokenloom.config import ModelConfig
from tokenloom.errors import ConfigError, InputError
from tokenloom.registry import Registry
from tokenloom.rng import RowRNG

# ---------------------------------------------------------------------------
# The kit
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["categorical", "diffusion", "flow"])
def test_builtin_heads_pass_the_kit(name):
    tokenloom.testing.check("head", name)


def test_third_party_head_registered_by_a_hook_passes_the_kit():
    reg = Registry.from_plugins([("mog-pkg", PLUGIN)], strict=True)
    assert reg.available("head") == ["mog"]
    tokenloom.testing.check("head", "mog", registry=reg)
    tokenloom.testing.check("head", "mog", registry=reg, components=1)


class _GlobalNoise(MixtureOfGaussians):
    """Wrong: draws its noise from torch's global generator, not the per-image RNG."""

    def sample(self, hidden, *, rng, step, stream=0, temperature=1.0, guidance=1.0, uncond=None):
        out = super().sample(hidden, rng=rng, step=step, stream=stream, temperature=temperature,
                             guidance=guidance, uncond=uncond)
        return out + torch.randn_like(out)


class _Blind(MixtureOfGaussians):
    """Wrong: its loss ignores the hidden state."""

    def loss(self, hidden, targets):
        return super().loss(torch.zeros_like(self.check_hidden(hidden)), targets)


class _Unchecked(MixtureOfGaussians):
    """Wrong: accepts any hidden width silently (pads it)."""

    def check_hidden(self, hidden, *, where="hidden"):
        return torch.nn.functional.pad(hidden, (0, max(0, self.hidden_dim - hidden.shape[-1])))[..., : self.hidden_dim]


@pytest.mark.parametrize("cls, match", [(_GlobalNoise, "randomness must come from rng"),
                                        (_Blind, "does not depend on the hidden state"),
                                        (_Unchecked, "wrong width")])
def test_the_kit_fails_wrong_heads(cls, match):
    plugin = type("P", (), {"register_heads": staticmethod(tokenloom.hookimpl(
        lambda register: register("wrong", cls)))})
    reg = Registry.from_plugins([("wrong-pkg", plugin)], strict=True)
    with pytest.raises(AssertionError, match=match):
        tokenloom.testing.check("head", "wrong", registry=reg)


def test_registry_refuses_a_head_without_a_bool_token_kind():
    class Bad(MixtureOfGaussians):
        continuous = "yes"

    plugin = type("P", (), {"register_heads": staticmethod(tokenloom.hookimpl(lambda register: register("bad", Bad)))})
    reg = Registry.from_plugins([("bad-pkg", plugin)])
    assert "bad" not in reg.available("head")
    assert any("continuous must be a bool" in f.error for f in reg.failures)


# ---------------------------------------------------------------------------
# RowRNG.normal
# ---------------------------------------------------------------------------


def test_normal_draws_are_per_image_and_standard():
    a = RowRNG(3, torch.arange(8)).normal(5, 4, 6, stream=2)
    assert a.shape == (8, 4, 6) and a.dtype == torch.float32
    b = RowRNG(3, torch.tensor([6, 2])).normal(5, 4, 6, stream=2)
    assert torch.equal(b, a[[6, 2]])  # image i depends on (seed, i) only
    assert not torch.equal(RowRNG(3, torch.arange(8)).normal(6, 4, 6, stream=2), a)  # the step matters
    assert not torch.equal(RowRNG(3, torch.arange(8)).normal(5, 4, 6, stream=3), a)  # and the stream
    # element c of the flattened shape is a function of c alone: a larger draw starts with the same numbers
    assert torch.equal(RowRNG(3, torch.arange(8)).normal(5, 30, stream=2)[:, :24], a.flatten(1))
    big = RowRNG(0, torch.arange(64)).normal(0, 4096)
    assert abs(float(big.mean())) < 0.01 and abs(float(big.std()) - 1.0) < 0.01
    # its own stream space: not a transform of the uniforms of the same (step, stream)
    r = RowRNG(1, torch.arange(4))
    u = r.uniform(0, 8)
    assert not torch.allclose(r.normal(0, 4), torch.sqrt(-2 * torch.log(u[:, 0::2])) * torch.cos(2 * math.pi * u[:, 1::2]))


def test_existing_draws_are_unchanged_by_the_normal_draw():
    r = RowRNG(11, torch.arange(3))
    before = (r.uniform(2, 5).clone(), r.gumbel(2, 5).clone())
    r.normal(2, 5)
    r2 = RowRNG(11, torch.arange(3))
    assert torch.equal(r2.uniform(2, 5), before[0]) and torch.equal(r2.gumbel(2, 5), before[1])


# ---------------------------------------------------------------------------
# MAR's diffusion loss: what is kept
# ---------------------------------------------------------------------------


def _diffusion(**cfg):
    return tokenloom.create("head", "diffusion", hidden_dim=8, token_dim=3, **cfg)


def _randomise(head, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))
    return head


def _mar_betas(n):
    """MAR's gaussian_diffusion.get_named_beta_schedule("cosine", n), written out."""
    def f(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=np.float64)


def _mar_respaced(n, k):
    """improved-diffusion's space_timesteps(n, [k]) and SpacedDiffusion's new betas."""
    frac, cur, taken = (n - 1) / (k - 1), 0.0, []
    for _ in range(k):
        taken.append(round(cur))
        cur += frac
    abar, last, betas = np.cumprod(1 - _mar_betas(n)), 1.0, []
    for i, a in enumerate(abar):
        if i in taken:
            betas.append(1 - a / last)
            last = a
    return taken, np.array(betas)


def test_diffusion_schedule_and_respacing_are_mars():
    head = _diffusion(num_timesteps=1000, sampling_steps=100)
    abar = np.cumprod(1 - _mar_betas(1000))
    assert np.allclose(head.alphas_cumprod.double().numpy(), abar, rtol=1e-6)
    taken, _ = _mar_respaced(1000, 100)
    assert head.timestep_map.tolist() == taken and taken[0] == 0 and taken[-1] == 999
    assert head.steps == 100


def test_untrained_denoiser_predicts_zero_as_mars_init():
    head = _diffusion()
    out = head.net(torch.randn(5, 3), torch.randint(0, 1000, (5,)), torch.randn(5, 8))
    assert torch.equal(out, torch.zeros_like(out))


def test_diffusion_loss_is_eps_prediction_on_several_noise_draws():
    head = _randomise(_diffusion(diffusion_batch_mul=4))
    hidden, x0 = torch.randn(6, 8), torch.randn(6, 3)
    rows = []
    head.net.input_proj.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    torch.manual_seed(5)
    loss = head.loss(hidden, x0)
    assert rows == [24]  # MAR's diffusion_batch_mul: every token 4 times
    torch.manual_seed(5)  # the same draws, written out
    t = torch.randint(0, 1000, (24,))
    eps = torch.randn(24, 3)
    abar = head.alphas_cumprod[t][:, None]
    xt = abar.sqrt() * x0.repeat(4, 1) + (1 - abar).sqrt() * eps
    want = (head.net(xt, t, hidden.repeat(4, 1)) - eps).pow(2).mean(-1).reshape(4, 6).mean(0)
    assert torch.allclose(loss, want, atol=1e-6)


def _mar_p_sample_loop(head, hidden, uncond, *, K, temperature, guidance):
    """The reference: p_sample_loop of MAR's SpacedDiffusion (fixed-small variance, x̂_0 not clipped)
    in float64 around ``head.net``, noise from the draws the head takes (RowRNG 9, step 2)."""
    noise = RowRNG(9, torch.arange(4)).normal(2, K, 3).double()
    taken, betas = _mar_respaced(200, K)
    alphas = 1 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1 - ac_prev) / (1 - ac)
    log_var = np.log(np.append(post_var[1], post_var[1:]))
    x = noise[:, 0]
    with torch.no_grad():
        for j, k in enumerate(reversed(range(K))):
            t = torch.full((4,), taken[k])
            eps = head.net(x.float(), t, hidden).double()
            if guidance != 1.0:
                u = head.net(x.float(), t, uncond).double()
                eps = u + guidance * (eps - u)
            x0 = math.sqrt(1 / ac[k]) * x - math.sqrt(1 / ac[k] - 1) * eps  # not clipped (MAR)
            mean = betas[k] * math.sqrt(ac_prev[k]) / (1 - ac[k]) * x0 + (1 - ac_prev[k]) * math.sqrt(alphas[k]) / (
                1 - ac[k]) * x
            x = mean + (math.exp(0.5 * log_var[k]) * noise[:, j + 1] * temperature if k > 0 else 0.0)
    return x


def _sample(head, hidden, uncond, *, K, temperature, guidance):
    return head.sample(hidden, rng=RowRNG(9, torch.arange(4)), step=2, temperature=temperature,
                       guidance=guidance, uncond=uncond if guidance != 1.0 else None)


@pytest.mark.parametrize("temperature, guidance", [(1.0, 1.0), (0.5, 1.0), (1.0, 3.0)])
def test_diffusion_sampling_is_mars_respaced_ddpm_with_its_temperature(temperature, guidance):
    """With a random denoiser: the head's own net, hidden states and guidance wired as MAR's loop."""
    K = 6
    head = _randomise(_diffusion(num_timesteps=200, sampling_steps=K), seed=1).eval()
    hidden, uncond = torch.randn(4, 8), torch.randn(4, 8)
    got = _sample(head, hidden, uncond, K=K, temperature=temperature, guidance=guidance)
    x = _mar_p_sample_loop(head, hidden, uncond, K=K, temperature=temperature, guidance=guidance)
    # relative to the tokens' scale: a random ε̂ is not the noise, so x̂_0 = x/sqrt(ᾱ) − … grows to
    # ~1e5 at the first respaced step, where the head's float32 arithmetic against this float64 loop
    # differs by ~1e-6 of that scale (CPU-dependent). The next test checks the noise terms tightly.
    assert (got.double() - x).abs().max() <= 1e-4 + 2e-5 * x.abs().max()


class _IdealDenoiser(torch.nn.Module):
    """The ε̂ whose x̂_0 is ``tanh(hidden) + x / 2``: a denoiser that knows a clean token near the
    data's scale (so the loop stays there, unlike a random one) yet depends on the noisy input, so
    every noise draw (× temperature) carries into the result (an x̂_0 independent of x would not)."""

    def __init__(self, abar: torch.Tensor):
        super().__init__()
        self.register_buffer("abar", abar.double())

    def forward(self, x, t, c):
        a = self.abar[t.long()][:, None]
        x0 = torch.tanh(c[:, :3].double()) + x.double() / 2
        return ((x.double() - a.sqrt() * x0) / (1 - a).sqrt()).to(x.dtype)


@pytest.mark.parametrize("temperature, guidance", [(1.0, 1.0), (0.5, 1.0), (0.0, 1.0), (1.0, 3.0)])
def test_diffusion_sampling_noise_and_guidance_are_mars_at_the_datas_scale(temperature, guidance):
    K = 6
    head = _diffusion(num_timesteps=200, sampling_steps=K).eval()
    head.net = _IdealDenoiser(torch.from_numpy(np.cumprod(1 - _mar_betas(200))))
    hidden, uncond = torch.randn(4, 8), torch.randn(4, 8)
    got = _sample(head, hidden, uncond, K=K, temperature=temperature, guidance=guidance)
    x = _mar_p_sample_loop(head, hidden, uncond, K=K, temperature=temperature, guidance=guidance)
    assert x.abs().max() < 20  # well conditioned: the tokens stay near the data's scale
    assert torch.allclose(got.double(), x, atol=1e-4)


def test_diffusion_clips_the_denoised_token_to_the_training_range():
    head = _diffusion(sampling_steps=5)
    assert "target_bound" in head.state_dict()  # saved with the weights
    head.train()
    head.loss(torch.randn(4, 8), torch.tensor([[0.5, -2.0, 1.0], [-1.5, 0.2, 0.1], [0, 0, 0], [1, 1, -0.5]]))
    assert torch.equal(head.target_bound, torch.tensor([1.5, 2.0, 1.0]))
    head.eval()
    head.loss(torch.randn(1, 8), torch.full((1, 3), 9.0))  # not in training: the range is kept
    assert torch.equal(head.target_bound, torch.tensor([1.5, 2.0, 1.0]))
    _randomise(head, seed=4, scale=1.0)  # a wild denoiser
    kw = {"rng": RowRNG(0, torch.arange(64)), "step": 0, "temperature": 0.0}
    clipped = head.sample(torch.randn(64, 8), **kw)
    # the last step's mean: coef1·x̂_0 with x̂_0 inside the bound (ᾱ_prev = 1 at the last step)
    assert (clipped.abs() <= head.target_bound * 1.0001).all()
    free = tokenloom.create("head", "diffusion", hidden_dim=8, token_dim=3, sampling_steps=5, clip_denoised=False)
    free.load_state_dict(head.state_dict())
    assert (free.eval().sample(torch.randn(64, 8), **kw).abs() > head.target_bound).any()  # MAR: unclipped


# ---------------------------------------------------------------------------
# Flow matching: what is kept
# ---------------------------------------------------------------------------


def test_flow_loss_is_the_linear_path_velocity_loss():
    head = _randomise(tokenloom.create("head", "flow", hidden_dim=8, token_dim=3))
    hidden, x = torch.randn(5, 8), torch.randn(5, 3)
    torch.manual_seed(2)
    loss = head.loss(hidden, x)
    torch.manual_seed(2)
    t = torch.rand(5)
    eps = torch.randn(5, 3)
    xt = (1 - t[:, None]) * x + t[:, None] * eps
    assert torch.allclose(loss, (head.velocity(xt, t, hidden) - (eps - x)).pow(2).mean(-1), atol=1e-6)


def test_flow_sampling_is_euler_from_noise_with_guided_velocity():
    head = _randomise(tokenloom.create("head", "flow", hidden_dim=8, token_dim=3, steps=4)).eval()
    hidden, uncond = torch.randn(3, 8), torch.randn(3, 8)
    got = head.sample(hidden, rng=RowRNG(0, torch.arange(3)), step=1, guidance=2.0, uncond=uncond, temperature=0.7)
    x = RowRNG(0, torch.arange(3)).normal(1, 3) * 0.7
    ts = torch.linspace(1, 0, 5)
    with torch.no_grad():
        for i in range(4):
            t = ts[i].expand(3)
            vc, vu = head.velocity(x, t, hidden), head.velocity(x, t, uncond)
            x = x + (ts[i + 1] - ts[i]) * (vu + 2.0 * (vc - vu))
    assert torch.allclose(got, x, rtol=1e-4, atol=1e-5)  # values of ~50: float32 rounding across runs
    grid = tokenloom.create("head", "flow", hidden_dim=8, token_dim=3, steps=4, time_grid="flowar").time_steps
    assert torch.allclose(grid, torch.tensor([1.0, 0.3, 0.25, 0.125, 0.0]))


# ---------------------------------------------------------------------------
# Composition errors
# ---------------------------------------------------------------------------


def _raw(**over):
    raw = {"seed": 0, "data": {"name": "shapes", "size": 8, "n": 48, "n_holdout": 8},
           "tokenizer": {"name": "patch", "patch": 2}, "generator": {"name": "raster"},
           "head": {"name": "diffusion", "width": 16, "depth": 1, "sampling_steps": 3},
           "model": {"n_layer": 1, "d_model": 16, "n_head": 2},
           "train": {"steps": 3, "batch_size": 4, "warmup": 1},
           "metrics": {"names": ["cost", "nll"], "n_samples": 4}}
    for k, v in over.items():
        if v is None:
            raw.pop(k, None)
        else:
            raw[k] = v
    return raw


def _compose(raw):
    from tokenloom.config import parse_config
    from tokenloom.pipeline_check import check_composition

    return check_composition(parse_config(raw))


@pytest.mark.parametrize("over, match", [
    ({"head": {"name": "categorical"}},
     r"head\.name: head 'categorical' models discrete codes.*'patch' gives continuous tokens"),
    ({"head": None}, r"head: tokenizer 'patch' gives continuous tokens.*\[head\]"),
    ({"tokenizer": {"name": "pixel", "bits": 1}},
     r"head\.name: head 'diffusion' models continuous tokens.*'pixel' gives discrete codes"),
    ({"head": {"name": "diffusion", "sampling_steps": 0}}, r"head\.sampling_steps"),
    ({"head": {"name": "flow", "steps": 0}}, r"head\.steps"),
    ({"sampler": [{"name": "cfg"}, {"name": "top-k", "k": 4}]},
     r"sampler\[1\]\.name: 'top-k' does not apply to the continuous head 'diffusion'"),
    ({"generator": {"name": "depth-stack"}}, r"generator.*continuous"),
])
def test_composition_errors_name_what_and_where(over, match):
    with pytest.raises(ConfigError, match=match):
        _compose(_raw(**over))


def test_a_continuous_composition_builds_its_head():
    parts = _compose(_raw(sampler=[{"name": "cfg", "scale": 2.0}, {"name": "temperature", "t": 0.9}]))
    assert parts.head.continuous and parts.head.token_dim == 12 and parts.head.hidden_dim == 16
    assert parts.generator.model_spec().token_dim == 12


# ---------------------------------------------------------------------------
# Categorical runs are unchanged
# ---------------------------------------------------------------------------


def test_categorical_keeps_run_ids_and_model_keys():
    from tokenloom.config import config_to_dict, parse_config
    from tokenloom.running.cache import model_key

    raw = _raw(tokenizer={"name": "pixel", "bits": 1}, head=None)
    plain = parse_config(raw)
    named = parse_config({**raw, "head": {"name": "categorical"}})
    assert "head" not in config_to_dict(plain) and config_to_dict(plain) == config_to_dict(named)
    parts = _compose(raw)
    spec = parts.generator.model_spec()
    assert "token_dim" not in spec.key() and parts.head is None
    assert model_key(plain, spec, "t", 3, "d") == model_key(named, spec, "t", 3, "d")
    cont = parse_config(_raw())
    other = parse_config(_raw(head={"name": "diffusion", "width": 32, "depth": 1, "sampling_steps": 3}))
    cspec = _compose(_raw()).generator.model_spec()
    assert model_key(cont, cspec, "t", 3, "d") != model_key(other, cspec, "t", 3, "d")  # the head is in the key
    resampled = parse_config(_raw(head={"name": "diffusion", "width": 16, "depth": 1, "sampling_steps": 4}))
    # ... but not its sampling-only options (Config.sampling_options): a sweep reuses the trained model
    assert model_key(cont, cspec, "t", 3, "d") == model_key(resampled, cspec, "t", 3, "d")


def test_categorical_head_is_the_backbones_cross_entropy():
    from tokenloom.model import build_model
    from tokenloom.train import batch_loss

    tok = tokenloom.create("tokenizer", "pixel", bits=1, image_shape=(1, 4, 4))
    gen = tokenloom.create("generator", "raster", tokenizer=tok)
    cfg = ModelConfig(n_layer=1, d_model=16, n_head=2)
    model = build_model(gen.model_spec(), cfg, n_classes=2, seed=0)
    assert model.token_head is None  # the categorical head is the backbone's own output layer
    codes = torch.randint(0, tok.vocab_size, (3, tok.layout.length))
    batch = gen.training_batch(codes, torch.tensor([0, 1, 2]))
    head = tokenloom.create("head", "categorical", hidden_dim=16, vocab_size=tok.vocab_size)
    head.out.weight.data.copy_(model.heads[0].weight.data)
    hidden = model(batch.inputs, batch.cond, positions=batch.positions, return_hidden=True)
    assert torch.allclose(head.loss(hidden, batch.targets).mean(), batch_loss(model, batch), atol=1e-6)


# ---------------------------------------------------------------------------
# Backbone, trainer and the raster order with continuous tokens
# ---------------------------------------------------------------------------


def _continuous_setup(head_name="diffusion", **head_cfg):
    from tokenloom.model import build_model

    tok = tokenloom.create("tokenizer", "patch", patch=2, image_shape=(3, 8, 8))
    gen = tokenloom.create("generator", "raster", tokenizer=tok)
    spec = gen.model_spec()
    cfg = ModelConfig(n_layer=1, d_model=16, n_head=2)

    def head():
        return tokenloom.create("head", head_name, hidden_dim=16, token_dim=tok.token_dim, **head_cfg)

    return tok, gen, build_model(spec, cfg, n_classes=3, seed=0, head=head)


def test_continuous_spec_and_training_batch():
    tok, gen, model = _continuous_setup()
    spec = gen.model_spec()
    assert (spec.input_kind, spec.input_dim, spec.token_dim, spec.heads, spec.vocab_size) == ("embeddings", 12, 12, (), 0)
    assert spec.key()["token_dim"] == 12
    x = tok.encode(torch.rand(2, 3, 8, 8) * 2 - 1)
    batch = gen.training_batch(x, torch.tensor([0, 1]))
    assert batch.targets.shape == (2, 16, 12) and torch.equal(batch.targets, x)
    assert torch.equal(batch.inputs[:, 1:], x[:, :-1]) and batch.loss_mask.all()
    with pytest.raises(InputError, match="raster.training_batch: latents"):
        gen.training_batch(torch.zeros(2, 16, 11), torch.tensor([0, 1]))
    assert model.token_head is not None and any(k.startswith("token_head.") for k in model.state_dict())
    with pytest.raises(ConfigError, match="continuous head"):
        from tokenloom.model import build_model
        build_model(spec, ModelConfig(n_layer=1, d_model=16, n_head=2), n_classes=3)


def test_batch_loss_goes_through_the_head_and_flops_count_it():
    from tokenloom.train import batch_loss

    tok, gen, model = _continuous_setup()
    x = tok.encode(torch.rand(3, 3, 8, 8) * 2 - 1)
    batch = gen.training_batch(x, torch.tensor([0, 1, 2]))
    torch.manual_seed(0)
    loss = batch_loss(model, batch)
    torch.manual_seed(0)
    hidden = model(batch.inputs, batch.cond, positions=batch.positions, return_hidden=True)
    assert torch.allclose(loss, model.token_head.loss(hidden.flatten(0, 1), x.flatten(0, 1)).mean(), atol=1e-6)
    loss.backward()
    assert model.token_head.net.final_layer.linear.weight.grad.abs().sum() > 0
    head = model.token_head
    assert model.head_flops_per_token() == 3 * 4 * head.eval_flops()  # fwd + bwd, 4 noise draws per token
    with_head = model.flops_per_token()
    model.token_head = None
    assert with_head == model.flops_per_token() + 3 * 4 * head.eval_flops()  # the backbone's own, plus the head's


@pytest.mark.parametrize("head_name", ["diffusion", "flow"])
def test_raster_decodes_latents_per_image_whatever_the_batch(head_name):
    from tokenloom.model import InstrumentedModel
    from tokenloom.sampling import SamplerChain

    tok, gen, model = _continuous_setup(head_name)
    _randomise(model.token_head, seed=3, scale=0.05)  # a trained-looking head: moderate predictions
    model.eval()
    chain = SamplerChain([tokenloom.create("sampler", "cfg", scale=2.0, schedule="linear"),
                          tokenloom.create("sampler", "temperature", t=0.8)])
    wrapped = InstrumentedModel(model)
    cond = torch.tensor([0, 1, 2, 0])
    with torch.inference_mode():
        out = gen.generate(wrapped, chain, cond, rng=RowRNG(4, torch.arange(4)))
    L, steps = tok.layout.length, model.token_head.steps
    assert out.shape == (4, L, 12) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert wrapped.nfe == L == gen.expected_nfe()  # backbone passes: one per token
    assert wrapped.head_steps == L * steps and wrapped.head_tokens == 4 * L
    # guidance is 1 at the first step of the linear schedule: no null rows there
    assert wrapped.head_evals == 4 * steps * (1 + 2 * (L - 1))
    with torch.inference_mode():
        sub = gen.generate(InstrumentedModel(model), chain, cond[[3, 1]], rng=RowRNG(4, torch.tensor([3, 1])))
    assert torch.allclose(sub, out[[3, 1]], rtol=1e-4, atol=1e-4)  # the same up to the kernels' blocking
    images = tok.decode(out)
    assert images.shape == (4, 3, 8, 8)


def test_raster_refuses_a_discrete_only_chain_at_decode_time():
    from tokenloom.model import InstrumentedModel
    from tokenloom.sampling import SamplerChain

    _, gen, model = _continuous_setup()
    chain = SamplerChain([tokenloom.create("sampler", "top-k", k=3)])
    with pytest.raises(ConfigError, match="does not apply to continuous tokens"):
        gen.generate(InstrumentedModel(model.eval()), chain, torch.tensor([0]), rng=RowRNG(0, torch.arange(1)))


def test_continuous_training_resumes_to_the_same_weights(tmp_path):
    from tokenloom.config import TrainConfig
    from tokenloom.train import train

    tok, gen, _ = _continuous_setup()
    x = tok.encode(torch.rand(12, 3, 8, 8) * 2 - 1)
    labels = torch.arange(12) % 3
    cfg = TrainConfig(steps=4, batch_size=4, warmup=1)
    _, _, straight = _continuous_setup()
    train(straight, gen, x, labels, cfg, seed=1, null_class=3, progress=False)
    _, _, resumed = _continuous_setup()
    ckpt = tmp_path / "state.safetensors"
    train(resumed, gen, x, labels, cfg, seed=1, null_class=3, progress=False, checkpoint=ckpt, stop_after=2)
    _, _, resumed = _continuous_setup()  # a fresh process: everything from the checkpoint
    result = train(resumed, gen, x, labels, cfg, seed=1, null_class=3, progress=False, checkpoint=ckpt)
    assert result.resumed_from == 2 and result.head_flops > 0
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k  # the head's weights and its target range included


@pytest.mark.parametrize("head", [{"name": "diffusion", "width": 16, "depth": 1, "sampling_steps": 3},
                                  {"name": "flow", "width": 16, "depth": 1, "steps": 3}])
def test_run_end_to_end_raster_with_a_continuous_head(tmp_path, head):
    from tokenloom.config import parse_config
    from tokenloom.pipeline import run

    raw = _raw(head=head, sampler=[{"name": "cfg", "scale": 2.0}, {"name": "temperature", "t": 0.9}])
    record = run(parse_config(raw), tmp_path, progress=False)
    m = record["metrics"]
    assert m["nll_bits_per_image"] is None  # no exact likelihood: none reported
    assert m["nfe"] == 16.0 and m["head_steps"] == 16 * 3 and m["head_steps_per_token"] == 3.0
    assert m["head_flops_per_image"] > 0 and 0 < m["train_head_flops"] < m["train_flops"]
    assert m["backbone_flops_per_image"] > 0
    assert record["train"]["head"] == head["name"] and record["config"]["head"]["name"] == head["name"]
    again = run(parse_config(raw), tmp_path, progress=False)
    assert again["cache"]["model_reused"] and again["metrics"]["head_flops_per_image"] == m["head_flops_per_image"]


def test_mixture_head_in_a_backbone_has_an_exact_raster_likelihood():
    from tokenloom.model import InstrumentedModel, build_model
    from tokenloom.train import heldout_nll

    tok = tokenloom.create("tokenizer", "patch", patch=4, image_shape=(1, 8, 8))
    gen = tokenloom.create("generator", "raster", tokenizer=tok)
    cfg = ModelConfig(n_layer=1, d_model=16, n_head=2)
    mog = attrs.evolve(MixtureOfGaussians.Config(), components=2)
    model = build_model(gen.model_spec(), cfg, n_classes=2, seed=0,
                        head=lambda: MixtureOfGaussians(mog, hidden_dim=16, token_dim=tok.token_dim)).eval()
    x = tok.encode(torch.rand(3, 1, 8, 8) * 2 - 1)
    wrapped = InstrumentedModel(model)
    ll = gen.log_likelihood(wrapped, x, torch.tensor([0, 1, 0]))
    assert ll.shape == (3,) and torch.isfinite(ll).all()
    nll = heldout_nll(gen, wrapped, x, torch.tensor([0, 1, 0]))
    assert nll["uniform_bits_per_image"] is None
    assert nll["nll_bits_per_image"] == pytest.approx(-float(ll.double().mean()) / math.log(2), rel=1e-5)
