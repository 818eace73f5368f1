"""Deviations from the authors' reference code (issue 18, item 5): each test
pins a detail that is now kept from the reference (or the option that exposes
it, with the reference's value as documented), and would fail on the old
behaviour."""

from __future__ import annotations

import math

import pytest
import torch

import tokenloom
from tokenloom.sampling import mass_ranked_from

# -- top-p / typical against Hugging Face transformers' warpers ---------------
# transformers is not installed: its formulas (generation/logits_process.py,
# TopPLogitsWarper and TypicalLogitsWarper, min_tokens_to_keep = 1) are written
# out here. transformers' generate() adds neither warper at p = 1.0.


def hf_top_p_keep(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return torch.isfinite(scores)
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative_probs <= (1 - top_p)
    remove[..., -1:] = False
    return ~remove.scatter(1, sorted_indices, remove)


def hf_typical_keep(scores: torch.Tensor, mass: float) -> torch.Tensor:
    if mass >= 1.0:
        return torch.isfinite(scores)
    normalized = torch.log_softmax(scores, dim=-1)
    p = torch.exp(normalized)
    ent = -(normalized * p).nansum(-1, keepdim=True)
    shifted = torch.abs((-normalized) - ent)
    sorted_scores, sorted_indices = torch.sort(shifted, descending=False)
    cumulative_probs = scores.gather(-1, sorted_indices).softmax(dim=-1).cumsum(dim=-1)
    last_ind = (cumulative_probs < mass).sum(dim=1).clamp(max=sorted_scores.shape[-1] - 1)
    remove = sorted_scores > sorted_scores.gather(1, last_ind.view(-1, 1))
    remove[..., :1] = False
    return ~remove.scatter(1, sorted_indices, remove)


def _random_logits(seed: int, rows: int = 16, V: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, V, generator=g, dtype=torch.float64) * torch.linspace(0.5, 6.0, rows)[:, None].double()


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0])
def test_top_p_is_transformers_top_p_warper(p):
    logits = _random_logits(1)
    kept = torch.isfinite(tokenloom.create("sampler", "top-p", p=p)(logits))
    assert torch.equal(kept, hf_top_p_keep(logits, p))


@pytest.mark.parametrize("mass", [0.05, 0.3, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0])
def test_typical_is_transformers_typical_warper(mass):
    logits = _random_logits(2)
    kept = torch.isfinite(tokenloom.create("sampler", "typical", mass=mass)(logits))
    assert torch.equal(kept, hf_typical_keep(logits, mass))


def test_top_p_and_typical_at_one_keep_a_tail_whose_preceding_mass_rounds_to_one():
    # 1 + e^-40 == 1.0 in float64: the old rule "mass before j < p" dropped every entry but the first
    logits = torch.tensor([[0.0, -40.0, -41.0, -42.0, -43.0]], dtype=torch.float64)
    probs = torch.softmax(logits, -1)
    assert float(probs[0, 0]) == 1.0  # the rounding the old rule tripped on
    assert torch.isfinite(tokenloom.create("sampler", "top-p", p=1.0)(logits)).all()
    assert torch.isfinite(tokenloom.create("sampler", "typical", mass=1.0)(logits)).all()


def test_mass_ranked_from_counts_ties_and_sums_the_tail_first():
    probs = torch.tensor([[0.4, 0.2, 0.2, 0.1, 0.1]], dtype=torch.float64)
    got = mass_ranked_from(probs, -probs)
    assert torch.allclose(got, torch.tensor([[1.0, 0.6, 0.6, 0.2, 0.2]], dtype=torch.float64))
    tiny = torch.tensor([[1.0, 1e-30, 1e-30]], dtype=torch.float64)
    assert float(mass_ranked_from(tiny, -tiny)[0, 1]) == 2e-30


# -- RAR: the reference's annealing window ------------------------------------


def tok(gh: int = 3, gw: int = 4, bits: int = 1):
    return tokenloom.create("tokenizer", "pixel", bits=bits, pool=2, image_shape=(3, 2 * gh, 2 * gw))


def test_rar_defaults_anneal_between_half_and_three_quarters_of_training():
    gen = tokenloom.create("generator", "raster", tokenizer=tok(), rar=True)
    assert (gen.config.rar_start, gen.config.rar_end) == (0.5, 0.75)  # rar.yaml: 125k, 187.5k of 250k
    expected = {0.0: 1.0, 0.25: 1.0, 0.5: 1.0, 0.625: 0.5, 0.75: 0.0, 0.9: 0.0}
    for progress, r in expected.items():
        gen.on_train_step(round(progress * 1000), 1000)
        assert math.isclose(gen.permute_probability(), r), progress
