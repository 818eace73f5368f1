"""The `pixel` tokenizer: posterization, idempotence, layouts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenloom
import tokenloom.testing


@pytest.mark.parametrize("config", [{}, {"bits": 1}, {"per_channel": True, "bits": 3}, {"pool": 2, "bits": 4}])
def test_pixel_passes_the_conformance_kit(config):
    tokenloom.testing.check("tokenizer", "pixel", **config)


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(bits=st.integers(1, 5), per_channel=st.booleans(), seed=st.integers(0, 1000))
def test_encode_decode_is_idempotent(bits, per_channel, seed):
    tok = tokenloom.create("tokenizer", "pixel", bits=bits, per_channel=per_channel, image_shape=(3, 4, 4))
    x = tokenloom.testing.random_images(2, (3, 4, 4), seed)
    codes = tok.encode(x)
    y = tok.decode(codes)
    assert torch.equal(tok.encode(y), codes)
    assert (y - x).abs().max() <= 1.0 / (2**bits - 1) + 1e-6  # at most half a level (levels are 2/(2^k-1) apart)


def test_layout_and_vocabulary():
    packed = tokenloom.create("tokenizer", "pixel", bits=2, image_shape=(3, 8, 8))
    assert packed.vocab_size == 64 and packed.layout.scales == ((8, 8),) and packed.layout.length == 64
    split = tokenloom.create("tokenizer", "pixel", bits=2, per_channel=True, image_shape=(3, 8, 8))
    assert split.vocab_size == 4 and split.layout.depth == 3 and split.layout.length == 192
    x = torch.full((1, 3, 8, 8), -1.0)
    x[0, 1] = 1.0  # green channel at the top level
    assert split.encode(x)[0, :3].tolist() == [0, 3, 0]  # depth-minor: channels of pixel 0
    assert packed.encode(x)[0, 0].item() == 0 * 16 + 3 * 4 + 0
    assert torch.equal(packed.code_embeddings()[12], torch.tensor([-1.0, 1.0, -1.0]))


def test_too_large_vocabulary_is_a_config_error():
    with pytest.raises(tokenloom.ConfigError, match="per_channel"):
        tokenloom.create("tokenizer", "pixel", bits=8, image_shape=(3, 8, 8))
