"""The plugin author's test: tokenloom's conformance kit, plus what is
specific to this tokenizer. The kit builds the tokenizer from a registry of
this plugin alone, so other installed plugins cannot change the outcome."""

import tokenloom_palette
import torch

import tokenloom.testing
from tokenloom.registry import Registry

REGISTRY = Registry.from_plugins([("palette", tokenloom_palette)], dist="tokenloom-palette", strict=True)


def test_palette_honours_the_tokenloom_contract():
    tokenloom.testing.check("tokenizer", "palette", registry=REGISTRY, colours=8)
    tokenloom.testing.check("tokenizer", "palette", registry=REGISTRY, colours=4, pool=2, image_shape=(3, 8, 8))


def test_fit_finds_the_colours_of_a_two_colour_image():
    cls = REGISTRY.get("tokenizer", "palette").cls
    tok = cls(cls.Config(colours=2), image_shape=(3, 4, 4))
    images = torch.full((2, 3, 4, 4), -0.5)
    images[:, 0, :2] = 0.75
    tok.fit(images)
    recon = tok.decode(tok.encode(images))
    assert torch.allclose(recon, images, atol=1e-6)
