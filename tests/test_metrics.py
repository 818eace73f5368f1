"""Metric plugins and the evaluation protocol (issue 7).

The torch-fidelity metrics are checked against a direct
``torch_fidelity.calculate_metrics`` call and against an independent
numpy/scipy Fréchet distance on the same features; the simple metrics
against hand-computed values; the edge inputs for clear errors. A tiny
``tokenloom-cnn`` trained in a few seconds on 16 px ``shapes`` stands in for
the default extractor.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import types
import warnings

import attrs
import numpy as np
import pytest
import torch
from conftest import tiny_config_toml

import tokenloom
from tokenloom import fidelity
from tokenloom.checkpoint import tensors_hash
from tokenloom.config import DataConfig
from tokenloom.data import load_dataset
from tokenloom.errors import ConfigError, InputError
from tokenloom.evalcard import card_differences, card_footnotes, evaluate
from tokenloom.frechet import frechet_distance, gaussian_fit
from tokenloom.interfaces import MetricContext, MetricResult, TokenLayout
from tokenloom.testing import check, metric_context

SIZE = 16


def shapes(n: int, seed: int, split: str = "train"):
    return load_dataset(DataConfig(name="shapes", size=SIZE, n=n, n_holdout=n), split=split, seed=seed)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> str:
    """A tokenloom-cnn (width 8: 32 feature dims, 3 shape classes) trained for
    a few seconds on 16 px shapes."""
    data = shapes(256, seed=100)
    net, _ = fidelity.train_extractor(data.images, data.labels, 3, width=8, size=SIZE, steps=40,
                                      batch_size=32, seed=0)
    path = tmp_path_factory.mktemp("extractor") / "tiny.safetensors"
    fidelity.save_extractor(path, net, {"purpose": "tests"})
    return str(path)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("TOKENLOOM_CACHE_DIR", str(tmp_path / "cache"))
    return str(tmp_path / "cache")


def fid_metric(weights: str, cache: str, **kw):
    return tokenloom.create("metric", "fid", weights=weights, cache_dir=cache, **kw)


def features(weights: str, images: torch.Tensor) -> np.ndarray:
    """Features computed here, independently of torch-fidelity's plumbing:
    the same uint8 quantisation, the net called directly."""
    net, _, _ = fidelity.load_extractor(weights)
    x = images if images.shape[1] == 3 else images.expand(-1, 3, -1, -1)
    x = torch.round((x + 1) * 127.5) / 127.5 - 1
    with torch.no_grad():
        return net.features(x).double().numpy()


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID from numpy/scipy (:mod:`tokenloom.frechet`), independent of torch-fidelity."""
    return frechet_distance(*gaussian_fit(a), *gaussian_fit(b))


class _U8(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = torch.round((x.expand(-1, 3, -1, -1) + 1) * 127.5).to(torch.uint8)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


# ---------------------------------------------------------------------------
# FID against torch-fidelity and an independent reference
# ---------------------------------------------------------------------------


def test_the_frechet_reference_matches_closed_forms():
    d = 5
    mu = np.arange(d, dtype=float)
    assert frechet_distance(np.zeros(d), np.eye(d), mu, np.eye(d)) == pytest.approx(float(mu @ mu))
    a, b = 0.5, 2.0  # N(0, a²I) vs N(0, b²I): d (a - b)²
    assert frechet_distance(np.zeros(d), a * a * np.eye(d), np.zeros(d), b * b * np.eye(d)) == pytest.approx(
        d * (a - b) ** 2)
    x = np.random.default_rng(0).normal(size=(200, 3))
    m, s = gaussian_fit(x)
    assert np.allclose(m, x.mean(0)) and np.allclose(s, np.cov(x, rowvar=False))
    assert frechet_distance(m, s, m, s) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match=r"features \[N >= 2, D\]"):
        gaussian_fit(np.zeros(4))


def test_fidelity_keeps_every_name_it_exported_before_the_split():
    from tokenloom import extractor, frechet

    for name in ("EXTRACTORS", "Extractor", "ExtractorNet", "ExtractorRecipe", "FidelityOptions",
                 "backend_version", "cache_dir", "default_extractor_path", "extract_features",
                 "frechet_distance", "images_digest", "load_extractor", "missing_weights_message",
                 "protocol_card", "resolve_extractor", "run_fidelity", "save_extractor", "to_uint8_rgb",
                 "train_extractor", "finite_or_none", "file_sha256", "classifier_accuracy", "CNN_NAME",
                 "INCEPTION_URL"):
        assert name in fidelity.__all__ and hasattr(fidelity, name), name
    assert fidelity.ExtractorNet is extractor.ExtractorNet and fidelity.load_extractor is extractor.load_extractor
    assert fidelity.frechet_distance is frechet.frechet_distance
    assert not any(hasattr(extractor, n) for n in ("run_fidelity", "FidelityOptions"))  # no torch-fidelity there


def test_fid_agrees_with_calculate_metrics_and_scipy(tiny_weights, cache):
    import torch_fidelity

    real, gen = shapes(120, seed=1).images, shapes(120, seed=2).images
    gen = (gen + 0.2 * torch.randn(gen.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    ours = fid_metric(tiny_weights, cache).compute(MetricContext(real=real, generated=gen)).values["fid"]

    fidelity.resolve_extractor(fidelity.FidelityOptions(weights=tiny_weights))  # registers tokenloom-cnn
    direct = torch_fidelity.calculate_metrics(
        input1=_U8(gen), input2=_U8(real), fid=True, feature_extractor="tokenloom-cnn",
        feature_extractor_weights_path=tiny_weights, cuda=False, cache=False, verbose=False, save_cpu_ram=True,
    )["frechet_inception_distance"]
    assert ours == pytest.approx(direct, rel=1e-9)

    reference = scipy_fid(features(tiny_weights, gen), features(tiny_weights, real))
    assert ours > 0.01
    assert ours == pytest.approx(reference, rel=1e-3)


def test_fid_of_a_set_against_itself_is_zero(tiny_weights, cache):
    real = shapes(80, seed=3).images
    fid = fid_metric(tiny_weights, cache).compute(MetricContext(real=real, generated=real.clone())).values["fid"]
    assert abs(fid) < 1e-6


def test_fid_grows_monotonically_with_gaussian_noise(tiny_weights, cache):
    real = shapes(100, seed=4).images
    g = torch.Generator().manual_seed(1)
    eps = torch.randn(real.shape, generator=g)
    metric = fid_metric(tiny_weights, cache)
    values = [metric.compute(MetricContext(real=real, generated=(real + s * eps).clamp(-1, 1))).values["fid"]
              for s in (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)]
    assert values[0] < 1e-6
    assert all(a < b for a, b in itertools.pairwise(values)), values


def test_fid_eval_card_records_the_protocol(tiny_weights, cache):
    real, gen = shapes(40, seed=5).images, shapes(50, seed=6).images
    metric = fid_metric(tiny_weights, cache, seed=7)
    before = fidelity.protocol_card("fid", metric.config)
    assert before["computed"] is False and before["extractor"] == "tokenloom-cnn"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = metric.compute(MetricContext(real=real, generated=gen))
    assert isinstance(result, MetricResult) and set(result.values) == {"fid"}
    card = result.card
    json.dumps(card)
    net_hash = fidelity.load_extractor(tiny_weights)[2]
    assert card["extractor"] == "tokenloom-cnn" and card["weights_sha256"] == net_hash
    assert card["backend"] == f"torch-fidelity {__import__('torch_fidelity').__version__}"
    assert card["reference"]["n"] == 40 and card["n_generated"] == 50 and card["seed"] == 7
    assert card["reference"]["sha256"] == fidelity.images_digest(fidelity.to_uint8_rgb(real, where="r")[0])
    assert "16×16" in card["resize"] and card["crop"] == "none"
    assert card["feature_layers"] == {"fid": "features"}


def test_cache_is_keyed_by_extractor_weights(tiny_weights, cache, tmp_path):
    real, gen = shapes(60, seed=8).images, shapes(60, seed=9).images
    data = shapes(128, seed=101)
    other_net, _ = fidelity.train_extractor(data.images, data.labels, 3, width=8, size=SIZE, steps=5, seed=1)
    other = tmp_path / "other.safetensors"
    h_other = fidelity.save_extractor(other, other_net)
    h_tiny = fidelity.load_extractor(tiny_weights)[2]
    assert h_other != h_tiny
    ctx = MetricContext(real=real, generated=gen)
    a = fid_metric(tiny_weights, cache).compute(ctx).values["fid"]
    b = fid_metric(str(other), cache).compute(ctx).values["fid"]
    again = fid_metric(tiny_weights, cache).compute(ctx).values["fid"]
    assert a != b and again == a  # a cache keyed by extractor name only would have served b from a's features
    names = [p.name for p in (tmp_path / "cache" / "fidelity").iterdir()]
    assert any(h_tiny[:12] in n for n in names) and any(h_other[:12] in n for n in names)


def test_fid_from_adm_style_reference_statistics(tiny_weights, cache, tmp_path):
    real, gen = shapes(100, seed=10).images, shapes(100, seed=11).images
    f = features(tiny_weights, real)
    npz = tmp_path / "ref.npz"
    mu, sigma = gaussian_fit(f)
    np.savez(npz, mu=mu, sigma=sigma)
    metric = fid_metric(tiny_weights, cache, reference_stats=str(npz))
    assert metric.requires == frozenset({"generated"})
    result = metric.compute(MetricContext(generated=gen))
    from_stats = result.values["fid"]
    from_images = fid_metric(tiny_weights, cache).compute(MetricContext(real=real, generated=gen)).values["fid"]
    assert from_stats == pytest.approx(from_images, rel=1e-4)
    assert result.card["reference"]["stats"] == str(npz)

    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(5), sigma=np.eye(5))
    with pytest.raises(InputError, match="do not match"):
        fid_metric(tiny_weights, cache, reference_stats=str(bad)).compute(MetricContext(generated=gen))


# ---------------------------------------------------------------------------
# IS, KID, precision/recall
# ---------------------------------------------------------------------------


def test_isc_kid_prc_agree_with_calculate_metrics(tiny_weights, cache):
    """Every number torch-fidelity gives — IS mean and std, KID mean and std,
    precision, recall and F-score — is the one a direct call gives."""
    import torch_fidelity

    real, gen = shapes(60, seed=12).images, shapes(60, seed=13).images
    gen = (gen + 0.3 * torch.randn(gen.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    ctx = MetricContext(real=real, generated=gen)
    isc = tokenloom.create("metric", "isc", weights=tiny_weights, splits=3).compute(ctx).values
    kid = tokenloom.create("metric", "kid", weights=tiny_weights, subsets=20, subset_size=30).compute(ctx).values
    prc = tokenloom.create("metric", "precision-recall", weights=tiny_weights).compute(ctx).values
    fidelity.resolve_extractor(fidelity.FidelityOptions(weights=tiny_weights))
    direct = torch_fidelity.calculate_metrics(
        input1=_U8(gen), input2=_U8(real), isc=True, kid=True, prc=True, isc_splits=3, kid_subsets=20,
        kid_subset_size=30, feature_extractor="tokenloom-cnn", feature_extractor_weights_path=tiny_weights,
        cuda=False, cache=False, verbose=False, save_cpu_ram=True, rng_seed=2020,
    )
    assert set(isc) == {"isc", "isc_std"} and set(kid) == {"kid", "kid_std"}
    assert set(prc) == {"precision", "recall", "f_score"}
    assert isc["isc"] == pytest.approx(direct["inception_score_mean"], rel=1e-9) and isc["isc"] >= 1.0
    assert isc["isc_std"] == pytest.approx(direct["inception_score_std"], rel=1e-9) and isc["isc_std"] > 0
    assert kid["kid"] == pytest.approx(direct["kernel_inception_distance_mean"], rel=1e-6, abs=1e-12)
    assert kid["kid_std"] == pytest.approx(direct["kernel_inception_distance_std"], rel=1e-6, abs=1e-12)
    assert kid["kid_std"] > 0
    for key in ("precision", "recall", "f_score"):
        assert prc[key] == pytest.approx(direct[key], rel=1e-9, abs=1e-12), key
        assert 0 <= prc[key] <= 1
    p, r = prc["precision"], prc["recall"]
    assert prc["f_score"] == pytest.approx(2 * p * r / (p + r))  # the harmonic mean, as documented
    assert (p, r) != (1.0, 1.0)  # the noise makes them informative, not trivially perfect


def test_kid_defaults_its_subset_size_to_the_sample_count(tiny_weights, cache):
    ctx = MetricContext(real=shapes(40, seed=14).images, generated=shapes(30, seed=15).images)
    metric = tokenloom.create("metric", "kid", weights=tiny_weights, subsets=5)
    assert metric.compute(ctx).card["kid_subset_size"] == 30


# ---------------------------------------------------------------------------
# Edge inputs: clear messages, not crashes deep in torch-fidelity
# ---------------------------------------------------------------------------


def test_kid_subset_larger_than_the_samples_is_a_clear_error(tiny_weights, cache):
    ctx = MetricContext(real=shapes(40, seed=16).images, generated=shapes(20, seed=17).images)
    with pytest.raises(InputError, match=r"subset size 50 is larger than the number of samples \(generated: 20"):
        tokenloom.create("metric", "kid", weights=tiny_weights, subset_size=50).compute(ctx)


def test_inception_score_needs_an_extractor_with_class_logits(tiny_weights, cache, tmp_path):
    ctx = MetricContext(generated=shapes(20, seed=18).images)
    fake_vgg = tmp_path / "vgg16.pth"
    fake_vgg.write_bytes(b"never loaded: the check comes first")
    with pytest.raises(InputError, match="needs class logits.*'vgg16'"):
        tokenloom.create("metric", "isc", extractor="vgg16", weights=str(fake_vgg), splits=2).compute(ctx)
    with pytest.raises(InputError, match="needs class logits"):
        tokenloom.create("metric", "isc", weights=tiny_weights, splits=2,
                         options={"feature_layer_isc": "features"}).compute(ctx)
    with pytest.raises(InputError, match="cannot make 50 IS splits"):
        tokenloom.create("metric", "isc", weights=tiny_weights, splits=50).compute(ctx)


def test_one_channel_images_are_replicated_and_the_card_says_so(tiny_weights, cache):
    grey_real = shapes(50, seed=19).images.mean(1, keepdim=True)
    grey_gen = shapes(50, seed=20).images.mean(1, keepdim=True)
    metric = fid_metric(tiny_weights, cache)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grey_result = metric.compute(MetricContext(real=grey_real, generated=grey_gen))
        grey, card = grey_result.values["fid"], grey_result.card
        rgb = fid_metric(tiny_weights, cache).compute(MetricContext(
            real=grey_real.expand(-1, 3, -1, -1), generated=grey_gen.expand(-1, 3, -1, -1))).values["fid"]
    assert grey == pytest.approx(rgb, rel=1e-9)
    assert any("1-channel images replicated to 3 channels" in n for n in card["input_notes"])


def test_fewer_samples_than_the_feature_dimension_warns_with_the_number_needed(tiny_weights, cache):
    ctx = MetricContext(real=shapes(20, seed=21).images, generated=shapes(20, seed=22).images)
    metric = fid_metric(tiny_weights, cache)
    with pytest.warns(RuntimeWarning, match="use at least 33 images"):
        result = metric.compute(ctx)
    assert result.values["fid"] is None or math.isfinite(result.values["fid"])
    assert any("at least 33" in w for w in result.card["warnings"])


def test_images_outside_the_contract_are_clear_errors(tiny_weights, cache):
    real = shapes(10, seed=23).images
    metric = fid_metric(tiny_weights, cache)
    for bad, what in (((real + 1) * 127.5, "must lie in"), (real[:, :2], "1 or 3 channels"),
                      (real[0], "expected images")):
        with pytest.raises(InputError, match=what):
            metric.compute(MetricContext(real=real, generated=bad))


def test_inception_without_weights_explains_how_to_provide_them(monkeypatch, tmp_path):
    def no_network(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(ConfigError) as err:
        tokenloom.create("metric", "fid", extractor="inception-v3-compat")
    msg = str(err.value)
    assert "never downloads" in msg and fidelity.INCEPTION_URL in msg and "weights = " in msg
    ctx = MetricContext(real=shapes(4, seed=24).images, generated=shapes(4, seed=25).images)
    with pytest.raises(ConfigError, match="no such file"):
        tokenloom.create("metric", "fid", extractor="inception-v3-compat",
                         weights=str(tmp_path / "missing.pth")).compute(ctx)
    from tokenloom.config import parse_config

    with pytest.raises(ConfigError, match="metrics.kid.*never downloads"):
        parse_config({"metrics": {"names": ["kid"], "kid": {"extractor": "inception-v3-compat"}}})


def test_torch_fidelity_options_are_validated_against_its_defaults():
    with pytest.raises(ConfigError, match="'kid_kernal' is not a torch-fidelity option.*did you mean 'kid_kernel'"):
        tokenloom.create("metric", "kid", options={"kid_kernal": "rbf"})
    with pytest.raises(ConfigError, match="'cuda' is set by tokenloom"):
        tokenloom.create("metric", "fid", options={"cuda": False})
    with pytest.raises(ConfigError, match="expects int"):
        tokenloom.create("metric", "kid", options={"kid_kernel_poly_degree": "3"})
    with pytest.raises(ConfigError, match="does not apply"):
        tokenloom.create("metric", "fid", options={"samples_find_deep": True})
    with pytest.raises(ConfigError, match="extractor"):
        tokenloom.create("metric", "fid", extractor="clip-vit-b-32")
    assert tokenloom.create("metric", "kid", options={"kid_kernel": "rbf"}).config.options == {"kid_kernel": "rbf"}


def test_nothing_downloads_with_the_default_extractor(tiny_weights, cache, monkeypatch):
    import urllib.request

    def no_network(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    ctx = MetricContext(real=shapes(40, seed=26).images, generated=shapes(40, seed=27).images)
    assert tokenloom.create("metric", "precision-recall", weights=tiny_weights).compute(ctx).values["precision"] >= 0


# ---------------------------------------------------------------------------
# The in-project extractor
# ---------------------------------------------------------------------------


def test_extractor_training_is_reproducible_from_its_seed():
    data = shapes(64, seed=28)

    def digest(seed):
        net, _ = fidelity.train_extractor(data.images, data.labels, 3, width=4, size=SIZE, steps=4, seed=seed)
        return tensors_hash(net.state_dict())

    assert digest(0) == digest(0) != digest(1)


def test_default_extractor_is_trained_once_and_cached(tmp_path):
    recipe = fidelity.ExtractorRecipe(sizes=(16,), n=48, n_holdout=16, size=16, steps=3, width=4)
    path = fidelity.default_extractor_path(recipe, tmp_path)
    mtime = path.stat().st_mtime_ns
    net, info, digest = fidelity.load_extractor(path)
    assert info["recipe"]["steps"] == 3 and 0 <= info["holdout_accuracy"] <= 1
    assert info["classes"][:3] == ["shapes:circle", "shapes:square", "shapes:triangle"] and net.n_classes == 13
    assert fidelity.default_extractor_path(recipe, tmp_path) == path and path.stat().st_mtime_ns == mtime
    path.write_bytes(b"corrupt")  # a corrupt cache entry is retrained, not trusted
    assert fidelity.load_extractor(fidelity.default_extractor_path(recipe, tmp_path))[2] == digest


def test_foreign_weights_file_is_a_clear_error(tmp_path, cache):
    from tokenloom.checkpoint import save_tensors
    from tokenloom.errors import CheckpointError

    path = tmp_path / "x.safetensors"
    save_tensors(path, {"w": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="not a tokenloom-cnn weights file"):
        fid_metric(str(path), cache).compute(metric_context())


# ---------------------------------------------------------------------------
# reconstruction, codebook, nll, cost, acceptance
# ---------------------------------------------------------------------------


def test_reconstruction_mse_and_psnr_against_the_formula():
    real = shapes(8, seed=29).images
    rec = (real - 0.1).clamp(-1, 1)
    metric = tokenloom.create("metric", "reconstruction", rfid=False)
    out = metric.compute(MetricContext(real=real, reconstructed=rec)).values
    x, y = (real.double() + 1) / 2, (rec.double() + 1) / 2
    per = ((x - y) ** 2).flatten(1).mean(1)
    assert out["mse"] == pytest.approx(per.mean().item())
    assert out["psnr"] == pytest.approx((10 * torch.log10(1 / per)).mean().item())
    assert out["rfid"] is None
    same = metric.compute(MetricContext(real=real, reconstructed=real.clone())).values
    assert same["mse"] == 0 and same["psnr"] == pytest.approx(100.0)
    with pytest.raises(InputError, match="same shape"):
        metric.compute(MetricContext(real=real, reconstructed=rec[:4]))


def test_reconstruction_rfid_is_the_fid_of_reconstructions(tiny_weights, cache):
    real = shapes(50, seed=30).images
    rec = (real + 0.1 * torch.randn(real.shape, generator=torch.Generator().manual_seed(3))).clamp(-1, 1)
    r = tokenloom.create("metric", "reconstruction", weights=tiny_weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec_result = r.compute(MetricContext(real=real, reconstructed=rec))
        fid = fid_metric(tiny_weights, cache).compute(MetricContext(real=real, generated=rec)).values["fid"]
    rfid = rec_result.values["rfid"]
    assert rfid == pytest.approx(fid, rel=1e-9) and rfid > 0
    assert rec_result.card["rfid"]["weights_sha256"] == fidelity.load_extractor(tiny_weights)[2]


class _Tok:
    def __init__(self, vocab=4, grid=(2, 2), image_shape=(3, 4, 4)):
        self.vocab_size, self.layout, self.image_shape = vocab, TokenLayout(scales=(grid,)), image_shape


def test_codebook_utilisation_and_perplexity():
    metric = tokenloom.create("metric", "codebook")
    half = metric.compute(MetricContext(codes=torch.tensor([[0, 0, 1, 1]]), tokenizer=_Tok())).values
    assert half == {"codebook_utilisation": 0.5, "codebook_perplexity": pytest.approx(2.0)}
    full = metric.compute(MetricContext(codes=torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]]), tokenizer=_Tok())).values
    assert full["codebook_utilisation"] == 1.0 and full["codebook_perplexity"] == pytest.approx(4.0)
    p = np.array([3, 1]) / 4
    skew = metric.compute(MetricContext(codes=torch.tensor([[0, 0, 0, 1]]), tokenizer=_Tok())).values
    assert skew["codebook_perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    with pytest.raises(InputError):
        metric.compute(MetricContext(codes=torch.tensor([[0, 0, 0, 4]]), tokenizer=_Tok()))


class _Gen:
    exact_likelihood = True

    def __init__(self, nats_per_image):
        self.nats = nats_per_image
        self.calls = []

    def log_likelihood(self, model, codes, cond):
        self.calls.append(cond.clone())
        return torch.full((len(codes),), -self.nats)


def test_nll_bits_for_exact_orders_and_none_for_others():
    codes = torch.zeros(5, 4, dtype=torch.long)
    gen = _Gen(nats_per_image=10.0)
    ctx = MetricContext(codes=codes, real_labels=torch.arange(5), model=object(), generator=gen, tokenizer=_Tok())
    out = tokenloom.create("metric", "nll", batch_size=2).compute(ctx).values
    bits = 10.0 / math.log(2)
    assert out["nll_bits_per_image"] == pytest.approx(bits)
    assert out["nll_bits_per_dim"] == pytest.approx(bits / 48) and out["nll_bits_per_token"] == pytest.approx(bits / 4)
    assert torch.equal(torch.cat(gen.calls), torch.arange(5))
    gen.exact_likelihood = False
    assert set(tokenloom.create("metric", "nll").compute(ctx).values.values()) == {None}
    with pytest.raises(InputError, match="not finite log-probabilities"):
        tokenloom.create("metric", "nll").compute(MetricContext(
            codes=codes, real_labels=torch.arange(5), model=object(), generator=_Gen(-1.0), tokenizer=_Tok()))


def test_cost_reads_recorded_statistics_and_never_invents():
    metric = tokenloom.create("metric", "cost")
    out = metric.compute(MetricContext(stats={"nfe": 16, "seconds_per_image": 0.5})).values
    assert out["nfe"] == 16.0 and out["seconds_per_image"] == 0.5
    assert {k for k, v in out.items() if v is None} == {"tokens_per_second", "peak_memory_bytes",
                                                        "kv_cache_bytes", "train_tokens", "train_flops",
                                                        # a continuous head's cost: not recorded here
                                                        "head_steps", "head_steps_per_token",
                                                        "head_flops_per_image", "train_head_flops",
                                                        "backbone_flops_per_image"}
    for bad in (-1, float("nan"), True, "3"):
        with pytest.raises(InputError, match="nfe"):
            metric.compute(MetricContext(stats={"nfe": bad}))


def test_acceptance_only_for_speculative_runs():
    metric = tokenloom.create("metric", "acceptance")
    assert set(metric.compute(MetricContext(stats={"nfe": 3})).values.values()) == {None}
    out = metric.compute(MetricContext(stats={"acceptance_rate": 0.75, "mean_accepted_length": 2.5,
                                              "speedup_nfe": 2.1})).values
    assert out == {"acceptance_rate": 0.75, "mean_accepted_length": 2.5, "speedup_nfe": 2.1,
                   "speedup_wallclock": None}
    with pytest.raises(InputError, match=r"in \[0, 1\]"):
        metric.compute(MetricContext(stats={"acceptance_rate": 1.5}))


# ---------------------------------------------------------------------------
# shapes-oracle
# ---------------------------------------------------------------------------


def test_shapes_oracle_scores_real_shapes_near_one_and_noise_near_zero():
    held = shapes(150, seed=31, split="holdout")
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(60, 3, SIZE, SIZE, generator=g) * 2 - 1
    metric = tokenloom.create("metric", "shapes-oracle")
    real_as_generated = metric.compute(MetricContext(real=held.images, generated=held.images,
                                                     real_labels=held.labels, generated_labels=held.labels,
                                                     data=held)).values
    assert real_as_generated["shapes_valid"] >= 0.95
    assert real_as_generated["shapes_valid_real"] >= 0.95 and real_as_generated["shapes_oracle_accuracy"] >= 0.95
    out = metric.compute(MetricContext(real=held.images, generated=noise, real_labels=held.labels,
                                       generated_labels=torch.arange(60) % 3, data=held)).values
    assert out["shapes_valid"] <= 0.05 and out["shapes_colour_ok"] <= 0.05
    wrong = metric.compute(MetricContext(generated=held.images, generated_labels=(held.labels + 1) % 3,
                                         data=held)).values
    assert wrong["shapes_valid"] <= 0.05 and wrong["shapes_class_ok"] <= 0.05


def test_shapes_oracle_checks_count_colour_and_layout():
    from tokenloom.data import render_shapes

    metric = tokenloom.create("metric", "shapes-oracle", max_real=0)
    one = {"shape": "square", "colour": "red", "position": (0.3, 0.3), "size": 0.12}
    far = {"shape": "square", "colour": "blue", "position": (0.7, 0.7), "size": 0.12}
    judge = metric.judge
    assert judge(render_shapes({"shapes": [one, far]}, 32), 1)["valid"]
    assert not judge(render_shapes({"shapes": [one, far]}, 32), 0)["class_ok"]  # asked for circles
    four = [dict(one, position=(x, y)) for x in (0.2, 0.75) for y in (0.2, 0.75)]
    assert not judge(render_shapes({"shapes": four}, 32), 1)["count_ok"]  # at most 3 shapes
    assert not judge(render_shapes({"shapes": []}, 32), None)["count_ok"]
    big = dict(one, position=(0.5, 0.5), size=0.3)
    assert not judge(render_shapes({"shapes": [big]}, 32), 1)["class_ok"]  # larger than the rules allow
    off = render_shapes({"shapes": [one]}, 32) * 0.5  # half-intensity: not a palette colour
    assert not judge(off, 1)["colour_ok"]
    touching = dict(far, position=(0.3 + 0.24, 0.3))  # one region of two colours
    assert not judge(render_shapes({"shapes": [one, touching]}, 32), 1)["valid"]
    close = dict(far, position=(0.42 + 1.5 / 64 + 0.12, 0.3))  # 1.5 px apart at 64 px; the rules want 4
    verdict = judge(render_shapes({"shapes": [one, close]}, 64), 1)
    assert verdict["count"] == 2 and verdict["class_ok"] and not verdict["layout_ok"]
    apart = dict(far, position=(0.42 + 4.5 / 64 + 0.12, 0.3))
    assert judge(render_shapes({"shapes": [one, apart]}, 64), 1)["valid"]


def test_shapes_oracle_is_not_applicable_to_other_data():
    digits = load_dataset(DataConfig(name="digits", size=SIZE, n=20, n_holdout=20), split="holdout", seed=0)
    out = tokenloom.create("metric", "shapes-oracle").compute(
        MetricContext(real=digits.images, generated=digits.images, data=digits))
    assert set(out.values.values()) == {None}
    assert "not_applicable" in out.card


# ---------------------------------------------------------------------------
# Conformance and eval-card footnotes
# ---------------------------------------------------------------------------


FIDELITY_FAMILY = ("fid", "isc", "kid", "precision-recall", "reconstruction")


@pytest.mark.parametrize("name", ["fid", "isc", "kid", "precision-recall", "reconstruction", "codebook", "nll",
                                  "cost", "acceptance", "shapes-oracle"])
def test_metric_conformance(name, tiny_weights, cache):
    config = {"weights": tiny_weights, "cache_dir": cache} if name in FIDELITY_FAMILY else {}
    if name == "isc":
        config["splits"] = 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        check("metric", name, **config)


def test_every_registered_metric_is_covered():
    assert set(tokenloom.available("metric")) >= {"fid", "isc", "kid", "precision-recall", "reconstruction",
                                                  "codebook", "nll", "cost", "acceptance", "shapes-oracle"}


def test_card_footnotes_mark_metrics_whose_cards_differ():
    a = {"extractor": "tokenloom-cnn", "reference": {"n": 500}, "n_generated": 64}
    runs = [
        {"id": "r1", "eval_cards": {"fid": a, "cost": {"device": "cpu"}}},
        {"id": "r2", "eval_cards": {"fid": dict(a, n_generated=128), "cost": {"device": "cpu"}}},
        {"id": "r3", "eval_cards": {"fid": dict(a, reference={"n": 250})}},
    ]
    notes = card_footnotes(runs)
    assert notes.marks == {"fid": "[^1]"} and len(notes.lines) == 1
    line = notes.lines[0]
    assert line.startswith("[^1]: fid:") and "n_generated: 64 (r1, r3); 128 (r2)" in line
    assert "reference.n: 500 (r1, r2); 250 (r3)" in line
    assert card_differences({"x": a, "y": dict(a)}) == {}
    assert card_footnotes([{"id": "x", "eval_cards": {"fid": a}}]).lines == []


TINY_GRID = tiny_config_toml(n_holdout=24, k=None, metrics=("codebook", "cost")) + """\
[grid]
tokenizer = [{name = "pixel", bits = 1, pool = 2}, {name = "pixel", bits = 2, pool = 2}]
"""


def test_results_md_footnotes_a_metric_whose_cards_differ_between_cells(tmp_path):
    """Two cells whose codebook cards differ (another vocabulary): the
    ablation's results.md marks the codebook columns and says what differs in
    which cell; the cost cards agree, so cost gets no mark."""
    from tokenloom.ablation import run_ablation

    grid = tmp_path / "grid.toml"
    grid.write_text(TINY_GRID)
    out = tmp_path / "out"
    run_ablation(grid, out, progress=False, echo=lambda _line: None)
    data = json.loads((out / "results.json").read_text())
    runs = data["runs"]
    vocab = {r["id"]: r["eval_cards"]["codebook"]["vocab_size"] for r in runs}
    assert len(runs) == 2 and len(set(vocab.values())) == 2
    assert runs[0]["eval_cards"]["cost"] == runs[1]["eval_cards"]["cost"]
    assert data["footnote_marks"] == {"codebook": "[^1]"}

    md = (out / "results.md").read_text().splitlines()
    header = next(line for line in md if line.startswith("| # |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    marked = [c for c in columns if c.endswith("[^1]")]
    assert marked and all(c.startswith("codebook_") for c in marked), columns
    assert not any("[^" in c for c in columns if not c.startswith("codebook_"))
    notes = [line for line in md if re.match(r"\[\^\d+\]:", line)]
    assert len(notes) == 1 and notes[0].startswith("[^1]: codebook: eval cards differ between cells")
    for rid, v in vocab.items():
        assert f"{v} ({rid})" in notes[0]
    assert "vocab_size:" in notes[0]


# ---------------------------------------------------------------------------
# The contract: values together with their card, nothing kept between calls
# ---------------------------------------------------------------------------


def test_compute_returns_values_with_their_card_and_keeps_no_state():
    small = MetricContext(codes=torch.tensor([[0, 0, 1, 1]]), tokenizer=_Tok())
    large = MetricContext(codes=torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]]), tokenizer=_Tok())
    metric = tokenloom.create("metric", "codebook")
    state = dict(vars(metric))
    first = metric.compute(small)
    other = metric.compute(large)
    again = metric.compute(small)
    assert vars(metric) == state  # compute wrote nothing on the metric
    assert first.card["n_images"] == 1 and other.card["n_images"] == 2
    assert again == first and again.card["metric"] == "codebook"
    for name, ctx in (("cost", MetricContext(stats={"nfe": 3.0})),
                      ("acceptance", MetricContext(stats={"acceptance_rate": 0.5})),
                      ("nll", MetricContext(codes=torch.zeros(2, 4, dtype=torch.long), real_labels=torch.arange(2),
                                            model=object(), generator=_Gen(3.0), tokenizer=_Tok()))):
        metric = tokenloom.create("metric", name)
        state = dict(vars(metric))
        result = metric.compute(ctx)
        assert isinstance(result, MetricResult) and result.card["metric"] == name
        assert vars(metric) == state and not hasattr(metric, "eval_card")
        json.dumps(result.card)


class _Mine(tokenloom.Metric):
    card_name = "mine"

    @attrs.frozen
    class Config:
        scale: float = 2.0


def test_metric_card_and_metric_result():
    metric = _Mine(_Mine.Config())
    assert metric.card(n=3, device="cpu") == {"metric": "mine", "n": 3, "device": "cpu"}
    assert metric.card() == {"metric": "mine", "config": {"scale": 2.0}}  # no protocol: the configuration
    values = {"a": 1.0}
    result = MetricResult(values, metric.card(n=1))
    values["a"] = 5.0
    assert result.values == {"a": 1.0}  # a copy: the result does not change behind the caller's back
    with pytest.raises(TypeError, match="values must be a mapping"):
        MetricResult([1.0], {})
    with pytest.raises(TypeError, match="card must be a mapping"):
        MetricResult({}, "fid")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        result.card = {}


class _FirstContract(tokenloom.Metric):
    """A metric written against the first contract: a plain mapping from
    compute, the card of the last call from eval_card()."""

    requires = frozenset({"stats"})

    @attrs.frozen
    class Config:
        pass

    def compute(self, ctx):
        self._n = len(ctx.stats)
        return {"n_stats": float(self._n)}

    def eval_card(self):
        return {"metric": "first", "n": self._n}


class _NoCard(_FirstContract):
    eval_card = None


class _Broken(_FirstContract):
    def compute(self, ctx):
        return [1.0]


def test_metrics_of_the_first_contract_are_read_through_evaluate():
    from tokenloom.errors import PluginError
    from tokenloom.registry import Registry
    from tokenloom.testing import check_metric

    ctx = MetricContext(stats={"nfe": 1.0, "seconds_per_image": 2.0})
    result = evaluate(_FirstContract(_FirstContract.Config()), ctx)
    assert result == MetricResult({"n_stats": 2.0}, {"metric": "first", "n": 2})
    assert evaluate(_NoCard(_NoCard.Config()), ctx).card == {"metric": "_NoCard", "config": {}}
    new = tokenloom.create("metric", "cost")
    assert evaluate(new, ctx) == new.compute(ctx)  # a MetricResult passes through unchanged
    with pytest.raises(PluginError, match="_Broken: compute must return a MetricResult"):
        evaluate(_Broken(_Broken.Config()), ctx)

    def register_metrics(register):
        register("first", _FirstContract)
        register("broken", _Broken)

    plugin = types.SimpleNamespace(register_metrics=tokenloom.hookimpl(register_metrics))
    registry = Registry.from_plugins([("first-contract", plugin)], strict=True)
    check_metric("first", registry=registry)  # the conformance kit reads it as a run does
    with pytest.raises(AssertionError, match="compute must return a MetricResult"):
        check_metric("broken", registry=registry)


# ---------------------------------------------------------------------------
# Heavier: the default extractor and a whole run (make test-all)
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_default_extractor_recipe_is_accurate_and_reproducible(tmp_path):
    a = fidelity.default_extractor_path(root=tmp_path / "a")
    b = fidelity.default_extractor_path(root=tmp_path / "b")
    _, info, digest = fidelity.load_extractor(a)
    assert fidelity.load_extractor(b)[2] == digest
    assert info["holdout_accuracy"] >= 0.95


@pytest.mark.slow
def test_a_run_with_every_metric_records_numbers_and_cards(tmp_path, monkeypatch):
    import urllib.request

    from tokenloom.config import parse_config, read_toml
    from tokenloom.pipeline import run

    def no_network(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setenv("TOKENLOOM_CACHE_DIR", str(tmp_path / "cache"))
    raw = read_toml(__import__("pathlib").Path(__file__).parents[1] / "examples" / "quick.toml")
    names = ["fid", "isc", "kid", "precision-recall", "reconstruction", "codebook", "nll", "cost", "acceptance",
             "shapes-oracle"]
    raw["train"]["steps"] = 30
    raw["metrics"] = {"names": names, "n_samples": 80, "isc": {"splits": 4}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        record = run(parse_config(raw), tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())["runs"][0]
    assert set(saved["eval_cards"]) == set(names)
    for key in ("fid", "isc", "kid", "precision", "recall", "mse", "psnr", "rfid", "codebook_utilisation",
                "codebook_perplexity", "nll_bits_per_image", "nll_bits_per_dim", "nfe", "seconds_per_image",
                "shapes_valid", "shapes_valid_real"):
        assert isinstance(saved["metrics"][key], float), key
    assert saved["metrics"]["acceptance_rate"] is None  # not a speculative run
    assert saved["metrics"]["shapes_valid_real"] >= 0.95
    card = saved["eval_cards"]["fid"]
    assert card["extractor"] == "tokenloom-cnn" and card["n_generated"] == 80 and card["reference"]["n"] > 0
    assert record["id"] == saved["id"]
