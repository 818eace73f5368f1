"""Continuous tokenizers (issue 17): ``kl`` (MAR/LDM's KL autoencoder, with
FlowAR's multi-scale layout as an option) and ``patch`` (raw pixel patches) —
the conformance kit's continuous contract, what each keeps from its
references, and the plumbing around continuous tokens (sampler context,
codebook and reconstruction metrics, fit-tokenizer, sample grid, a
discrete-only order refusing them)."""

from __future__ import annotations

import json
import types

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import tokenloom
import tokenloom.testing
from tokenloom.checkpoint import load_component
from tokenloom.config import DataConfig
from tokenloom.data import load_dataset
from tokenloom.registry import Registry
from tokenloom.tokenizer_train import evaluate_reconstruction

SMALL_KL = {"channels": 8, "token_dim": 4}


def _shapes(size=16, n=64, split="train"):
    return load_dataset(DataConfig(name="shapes", size=size, n=n, n_holdout=32), split=split, seed=0).images


def _kl(**options):
    return tokenloom.create("tokenizer", "kl", image_shape=(3, 16, 16), **{**SMALL_KL, **options})


# ---------------------------------------------------------------------------
# the conformance kit
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, config, shape", [
    ("kl", SMALL_KL, (3, 16, 16)),
    ("kl", {**SMALL_KL, "scales": [1, 2, 4]}, (3, 16, 16)),
    ("kl", {**SMALL_KL, "downsample": 2, "token_dim": 2}, (1, 8, 8)),
    ("patch", {}, (3, 16, 16)),
    ("patch", {"patch": 4}, (1, 16, 16)),
])
def test_kit(name, config, shape):
    tokenloom.testing.check("tokenizer", name, image_shape=shape, max_examples=4, **config)


def test_both_are_registered_continuous():
    assert {"kl", "patch"} <= set(tokenloom.available("tokenizer"))
    for name in ("kl", "patch"):
        tok = tokenloom.create("tokenizer", name, image_shape=(3, 16, 16))
        assert tok.continuous and tok.vocab_size == 0 and tok.token_dim >= 1
    assert not tokenloom.create("tokenizer", "vq", image_shape=(3, 16, 16)).continuous


def _broken(kind: str) -> type:
    """The kl tokenizer with one contract violation, to see the kit catch it."""
    cls = type(_kl())

    class Broken(cls):
        def encode(self, images):
            z = super().encode(images)
            if kind == "draws" and self.training:  # tokens must be the posterior mean, never a draw
                return z + torch.randn_like(z)
            return z.double() if kind == "double" else z

        def decode(self, latents):
            if kind == "unchecked":  # no validation: NaN latents decode silently
                h, w = self.grid
                z = latents.float().reshape(-1, h, w, self.token_dim).permute(0, 3, 1, 2)
                return self._per_image(lambda b: self.decoder(b).nan_to_num(0.0).clamp(-1, 1), z)
            return super().decode(latents)

    return Broken


def _registry_with(name: str, cls: type):
    ns = types.SimpleNamespace(register_tokenizers=tokenloom.hookimpl(lambda register: register(name, cls)))
    return Registry.from_plugins([(f"wrong-{name}", ns)], strict=True)


@pytest.mark.parametrize("kind, match", [("draws", "random state"), ("double", "float32"),
                                         ("unchecked", "NaN.*accepted silently")])
def test_the_kit_catches_violations(kind, match):
    with pytest.raises(AssertionError, match=match):
        tokenloom.testing.check("tokenizer", "broken", registry=_registry_with("broken", _broken(kind)),
                                image_shape=(3, 16, 16), max_examples=2, recon_steps=0, recon_bound=1e9,
                                **SMALL_KL)


# ---------------------------------------------------------------------------
# kl
# ---------------------------------------------------------------------------


def test_kl_fits_and_reconstructs_better_than_at_init():
    train, held = _shapes(n=96), _shapes(n=96, split="holdout")
    tok = _kl(steps=150, batch_size=16, lr=3e-3)
    before = evaluate_reconstruction(tok, held)["mse"]
    stats = tok.fit(train, progress=False)
    after = evaluate_reconstruction(tok, held)
    assert after["mse"] < 0.5 * before, (before, after["mse"])
    assert after["utilisation"] is None and after["perplexity"] is None and after["token_dim"] == 4
    # the fitted scale factor gives the training tokens unit spread (LDM's scale_by_std)
    assert stats["latent_scale"] == pytest.approx(float(tok.latent_scale))
    with torch.no_grad():
        z = tok.encode(train)
    assert float(z.std()) == pytest.approx(1.0, rel=0.05)


def test_kl_encode_is_the_posterior_mean_and_training_draws():
    tok = _kl()
    x = _shapes(n=4)
    with torch.no_grad():
        z = tok.encoder(x)
        mean, logvar = tok.posterior(z)
        tok.eval()
        tokens = tok.encode(x)
    assert torch.allclose(tokens, mean.permute(0, 2, 3, 1).reshape(4, 16, 4), atol=1e-5)
    tok.train()
    torch.manual_seed(0)
    q0 = tok.quantize(z)
    torch.manual_seed(1)
    q1 = tok.quantize(z)
    assert torch.equal(q0.codes, q1.codes)  # tokens: the mean in training too
    assert not torch.equal(q0.latent, q1.latent)  # the decoder's input: a reparameterised draw
    std = torch.exp(0.5 * logvar)
    assert float(((q0.latent - mean) / std).std()) == pytest.approx(1.0, rel=0.2)


def test_kl_term_is_ldm_kl_summed_per_image_over_the_pixel_count():
    tok = _kl(kl_weight=0.5).train()
    mean = torch.full((2, 4, 4, 4), 0.5)
    logvar = torch.full((2, 4, 4, 4), -1.0)
    q = tok.quantize(torch.cat([mean, logvar], 1))
    kl_image = 0.5 * (0.25 + torch.exp(torch.tensor(-1.0)) - 1 + 1) * 64  # 64 latent values per image
    assert float(q.loss) == pytest.approx(0.5 * float(kl_image) / (3 * 16 * 16), rel=1e-5)
    assert q.stats["kl"] == pytest.approx(float(kl_image), rel=1e-5)
    # LDM clamps the log-variance to [-30, 20]
    big = tok.quantize(torch.cat([mean, torch.full_like(logvar, 100.0)], 1))
    assert big.stats["std"] == pytest.approx(float(torch.exp(torch.tensor(10.0))), rel=1e-4)


def test_kl_without_scale_factor_keeps_one():
    tok = _kl(steps=2, scale_latents=False)
    tok.fit(_shapes(n=16), progress=False)
    assert float(tok.latent_scale) == 1.0


def test_kl_scale_factor_survives_save_and_load(tmp_path):
    tok = _kl(steps=2)
    tok.fit(_shapes(n=16), progress=False)
    assert float(tok.latent_scale) != 1.0
    from tokenloom.checkpoint import save_tokenizer

    save_tokenizer(tmp_path / "t.safetensors", tok, name="kl", options=SMALL_KL)
    loaded = load_component(tmp_path / "t.safetensors")
    assert float(loaded.latent_scale) == float(tok.latent_scale)


def test_kl_multiscale_layout_is_flowar_area_downsampling():
    tok = _kl(scales=[1, 2, 4]).eval()
    assert tok.layout.scales == ((1, 1), (2, 2), (4, 4)) and not tok.layout.residual
    assert tok.layout.length == 21 and isinstance(tok, tokenloom.MultiScaleInputs) and tok.embed_dim == 4
    x = _shapes(n=3)
    with torch.no_grad():
        z = tok.encode(x)
    finest = z[:, 5:].reshape(3, 4, 4, 4).permute(0, 3, 1, 2)
    single = _kl()
    single.load_state_dict(tok.state_dict())
    with torch.no_grad():
        assert torch.equal(z[:, 5:], single.eval().encode(x))  # the finest scale is the latent itself
    for sl, s in ((slice(0, 1), 1), (slice(1, 5), 2)):
        want = F.interpolate(finest, size=(s, s), mode="area").permute(0, 2, 3, 1).reshape(3, s * s, 4)
        assert torch.allclose(z[:, sl], want, atol=1e-6)


def test_kl_multiscale_scale_inputs_follow_flowar():
    tok = _kl(scales=[1, 2, 4]).eval()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 21, 4, generator=g)
    inp = tok.scale_inputs(z)
    assert tuple(inp.shape) == (2, 20, 4)
    # FlowAR: interpolate(interpolate(previous, (h, w), 'bicubic'), (s, s), 'area')
    s0 = z[:, :1].reshape(2, 1, 1, 4).permute(0, 3, 1, 2)
    s1 = z[:, 1:5].reshape(2, 2, 2, 4).permute(0, 3, 1, 2)
    want1 = F.interpolate(F.interpolate(s0, size=(4, 4), mode="bicubic"), size=(2, 2), mode="area")
    want2 = F.interpolate(s1, size=(4, 4), mode="bicubic")
    assert torch.allclose(inp[:, :4], want1.permute(0, 2, 3, 1).reshape(2, 4, 4), atol=1e-6)
    assert torch.allclose(inp[:, 4:], want2.permute(0, 2, 3, 1).reshape(2, 16, 4), atol=1e-6)
    # the input of scale k depends on scale k - 1 only, never on scale k itself or later ones
    z2 = z.clone()
    z2[:, 5:] += 1.0
    assert torch.equal(tok.scale_inputs(z2), inp)
    # single scale: no inputs
    assert tuple(_kl().scale_inputs(torch.zeros(2, 16, 4)).shape) == (2, 0, 4)


def test_kl_multiscale_decodes_the_finest_scale_only():
    tok = _kl(scales=[1, 2, 4]).eval()
    z = torch.randn(2, 21, 4, generator=torch.Generator().manual_seed(1))
    other = z.clone()
    other[:, :5] = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(tok.decode(z), tok.decode(other))
        changed = z.clone()
        changed[:, -1] += 3.0
        assert not torch.equal(tok.decode(changed), tok.decode(z))


@pytest.mark.parametrize("options, match", [
    ({"scales": [1, 2, 3]}, "last scale must equal the latent grid side 4"),
    ({"scales": [2, 1, 4]}, "strictly increasing"),
    ({"token_dim": 0}, "token_dim"),
    ({"kl_weight": -1.0}, "kl_weight"),
    ({"downsample": 3}, "downsample"),
])
def test_kl_bad_configs_are_config_errors(options, match):
    with pytest.raises(tokenloom.ConfigError, match=match):
        _kl(**options)


def test_kl_bad_latents_name_the_problem():
    tok = _kl().eval()
    good = torch.zeros(2, 16, 4)
    bad = good.clone()
    bad[1, 3, 0] = float("nan")
    with pytest.raises(tokenloom.InputError, match=r"KLTokenizer.decode: latents: NaN or infinite values in rows \[1\]"):
        tok.decode(bad)
    bad[1, 3, 0] = float("inf")
    with pytest.raises(tokenloom.InputError, match="NaN or infinite"):
        tok.decode(bad)
    with pytest.raises(tokenloom.InputError, match=r"expected shape \[B, 16, 4\].*got \(2, 16, 5\)"):
        tok.decode(torch.zeros(2, 16, 5))
    with pytest.raises(tokenloom.InputError, match="discrete codes given to a continuous"):
        tok.decode(torch.zeros(2, 16, dtype=torch.long))
    with pytest.raises(tokenloom.InputError, match="latents"):
        tok.scale_inputs(torch.zeros(2, 16, 3))
    with pytest.raises(tokenloom.ConfigError, match="no codebook"):
        tok.code_embeddings()


# ---------------------------------------------------------------------------
# patch
# ---------------------------------------------------------------------------


def test_patch_is_the_exact_inverse_in_mar_patchify_order():
    tok = tokenloom.create("tokenizer", "patch", image_shape=(3, 16, 12), patch=4)
    assert tok.layout.scales == ((4, 3),) and tok.token_dim == 48 and tok.cell_local
    x = torch.rand(5, 3, 16, 12) * 2 - 1
    z = tok.encode(x)
    assert z.dtype == torch.float32 and tuple(z.shape) == (5, 12, 48)
    assert torch.equal(tok.decode(z), x)  # bit for bit
    # MAR/FlowAR's patchify: nchpwq -> nhwcpq
    want = torch.einsum("nchpwq->nhwcpq", x.reshape(5, 3, 4, 4, 3, 4)).reshape(5, 12, 48)
    assert torch.equal(z, want)
    assert tok.fit(x) == {}  # training-free


def test_patch_decode_clamps_what_a_head_may_produce():
    tok = tokenloom.create("tokenizer", "patch", image_shape=(1, 4, 4), patch=2)
    y = tok.decode(torch.full((1, 4, 4), 3.0))
    assert float(y.max()) == 1.0


def test_patch_bad_config_and_input():
    with pytest.raises(tokenloom.ConfigError, match="patch = 3 does not divide the image size 16×16"):
        tokenloom.create("tokenizer", "patch", image_shape=(3, 16, 16), patch=3)
    tok = tokenloom.create("tokenizer", "patch", image_shape=(3, 16, 16))
    with pytest.raises(tokenloom.InputError, match=r"PatchTokenizer.decode: latents: expected shape \[B, 64, 12\]"):
        tok.decode(torch.zeros(1, 64, 11))
    with pytest.raises(tokenloom.InputError, match="discrete codes"):
        tok.decode(torch.zeros(1, 64, 12, dtype=torch.int64))
    with pytest.raises(tokenloom.ConfigError, match="no codebook"):
        tok.code_embeddings()


def test_evaluate_reconstruction_of_patches():
    tok = tokenloom.create("tokenizer", "patch", image_shape=(3, 16, 16))
    x = _shapes(n=8)
    ev = evaluate_reconstruction(tok, x, batch_size=3)
    assert ev["mse"] == 0 and ev["vocab_size"] == 0 and ev["token_dim"] == 12
    assert ev["utilisation"] is None and ev["perplexity"] is None
    assert ev["latent_mean"] == pytest.approx(float(x.double().mean()))
    assert ev["latent_std"] == pytest.approx(float(x.double().std()))


# ---------------------------------------------------------------------------
# plumbing
# ---------------------------------------------------------------------------


def test_codebook_metric_is_not_applicable_to_continuous_tokens():
    tok = tokenloom.create("tokenizer", "patch", image_shape=(3, 16, 16))
    x = _shapes(n=4)
    metric = tokenloom.create("metric", "codebook")
    res = metric.compute(tokenloom.MetricContext(codes=tok.encode(x), tokenizer=tok))
    assert res.values == {"codebook_utilisation": None, "codebook_perplexity": None}
    assert "continuous" in res.card["not_applicable"] and res.card["token_dim"] == 12
    # discrete tokens still count
    vq = tokenloom.create("tokenizer", "pixel", image_shape=(3, 16, 16), bits=1)
    res = metric.compute(tokenloom.MetricContext(codes=vq.encode(x), tokenizer=vq))
    assert res.values["codebook_utilisation"] is not None and res.values["codebook_utilisation"] > 0


def test_reconstruction_metric_takes_a_continuous_round_trip():
    tok = _kl().eval()
    x = _shapes(n=4)
    with torch.no_grad():
        rec = tok.decode(tok.encode(x))
    metric = tokenloom.create("metric", "reconstruction", rfid=False)
    res = metric.compute(tokenloom.MetricContext(real=x, reconstructed=rec, codes=tok.encode(x), tokenizer=tok))
    assert res.values["mse"] > 0 and res.values["psnr"] is not None and res.values["rfid"] is None


def test_sampler_context_for_continuous_tokens():
    from tokenloom.pipeline import bind_chain

    class Chain:
        def bind(self, context):
            self.context = context

    class Model:
        def token_embeddings(self):
            return None

    chain = bind_chain(Chain(), tokenloom.create("tokenizer", "patch", image_shape=(3, 16, 16)), Model())
    assert chain.context.vocab_size == 0 and chain.context.code_embeddings is None
    vq = tokenloom.create("tokenizer", "pixel", image_shape=(3, 16, 16), bits=1)
    chain = bind_chain(Chain(), vq, Model())
    assert chain.context.vocab_size == 8 and tuple(chain.context.code_embeddings.shape) == (8, 3)


def test_decode_path_and_sample_grid(tmp_path):
    from tokenloom.running.generation import decode_all
    from tokenloom.running.images import save_grid

    tok = tokenloom.create("tokenizer", "patch", image_shape=(3, 16, 16))
    x = _shapes(n=10)
    imgs = decode_all(tok, tok.encode(x), torch.device("cpu"), batch_size=4)
    assert torch.equal(imgs, x)
    save_grid(tmp_path / "g.png", imgs, ncol=5)
    from PIL import Image

    with Image.open(tmp_path / "g.png") as im:
        assert im.size[0] > im.size[1]  # two rows of five


def test_a_discrete_only_order_refuses_continuous_tokens():
    tok = _kl()
    with pytest.raises(tokenloom.ConfigError, match=r"(?s)DepthStack.*KLTokenizer.*continuous"):
        tokenloom.create("generator", "depth-stack", tokenizer=tok)


def test_check_names_the_order_and_the_tokenizer(tmp_path):
    from tokenloom.cli import cli

    cfg = tmp_path / "run.toml"
    cfg.write_text('seed = 0\n[data]\nname = "shapes"\nsize = 16\nn = 32\nn_holdout = 8\n'
                   '[tokenizer]\nname = "kl"\n[generator]\nname = "depth-stack"\n')
    res = CliRunner().invoke(cli, ["check", str(cfg)])
    assert res.exit_code != 0
    assert "KLTokenizer" in res.output and "DepthStack" in res.output and "continuous" in res.output


def test_fit_tokenizer_command_with_kl(tmp_path):
    from tokenloom.cli import cli

    cfg = tmp_path / "tok.toml"
    cfg.write_text('seed = 0\n[data]\nname = "shapes"\nsize = 16\nn = 32\nn_holdout = 8\n'
                   '[tokenizer]\nname = "kl"\nchannels = 8\ntoken_dim = 3\nsteps = 3\nscales = [1, 2, 4]\n')
    check = CliRunner().invoke(cli, ["check", "--fit-tokenizer", str(cfg)])
    assert check.exit_code == 0, check.output
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["fit-tokenizer", str(cfg), "--out", str(out), "--no-progress", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "continuous tokens of width 3" in res.output and "held-out PSNR" in res.output
    report = json.loads((out / "reconstruction.json").read_text())
    ho = report["holdout"]
    assert ho["n_images"] == 8 and ho["tokens_per_image"] == 21 and ho["token_dim"] == 3
    assert ho["utilisation"] is None and ho["perplexity"] is None and ho["latent_std"] > 0
    assert report["fit"]["latent_scale"] > 0
    md = (out / "reconstruction.md").read_text()
    assert "continuous tokens of width 3 (no vocabulary)" in md and "token std" in md
    tok = load_component(out / "tokenizer.safetensors")
    assert tok.continuous and tok.layout.length == 21
    assert float(tok.latent_scale) == pytest.approx(report["fit"]["latent_scale"])
