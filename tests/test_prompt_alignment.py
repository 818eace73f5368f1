"""The prompt-alignment metric: the shapes parser reads generated images back and compares them
with what their prompts ask for (one shared parser: tokenloom.data.parse_shapes / shape_regions
for images, tokenloom.data.parse_caption for prompts)."""

from __future__ import annotations

import pytest

import tokenloom
import tokenloom.testing
from tokenloom.config import DataConfig
from tokenloom.data import load_dataset, parse_caption, shapes_attributes, shapes_caption


@pytest.fixture(scope="module")
def shapes():
    return load_dataset(DataConfig(name="shapes", size=32, n=8, n_holdout=48), split="holdout", seed=0)


def conditions(data, captions=None):
    caps = data.captions if captions is None else captions
    return [tokenloom.Condition(label=int(y), caption=c) for y, c in zip(data.labels.tolist(), caps)]


def score(data, conds=None, labels=None, images=None):
    m = tokenloom.create("metric", "prompt-alignment")
    ctx = tokenloom.MetricContext(generated=data.images if images is None else images, data=data,
                                  generated_conditions=conds, generated_labels=labels)
    return m.compute(ctx)


def test_the_kit_passes():
    tokenloom.testing.check("metric", "prompt-alignment")


def test_every_caption_template_is_read_back_exactly():
    for a in shapes_attributes(3, range(60)):
        for t in range(3):
            want = {"count": a["count"], "class": a["class"], "colours": sorted(a["colours"])}
            assert parse_caption(shapes_caption(a, t)) == want, shapes_caption(a, t)
    assert parse_caption("two red squares") == {"count": 2, "class": "square", "colours": ["red", "red"]}
    assert parse_caption("a cat") is None and parse_caption("two red") is None
    assert parse_caption("three squares, red and blue") is None  # colours do not add up to the count


def test_real_images_match_their_own_captions_and_not_shuffled_ones(shapes):
    own = score(shapes, conditions(shapes)).values
    assert own["prompt_alignment"] >= 0.9 and own["prompt_count_ok"] == 1.0 and own["prompt_colour_ok"] == 1.0
    shifted = list(shapes.captions[1:]) + list(shapes.captions[:1])
    wrong = score(shapes, conditions(shapes, shifted)).values
    assert wrong["prompt_alignment"] <= 0.2 < own["prompt_alignment"]
    # one image, asked for something else, drops by exactly one image
    caps = list(shapes.captions)
    caps[0] = "three magenta triangles" if caps[0] != "three magenta triangles" else "a red circle"
    one = score(shapes, conditions(shapes, caps)).values
    assert abs(own["prompt_alignment"] - one["prompt_alignment"] - 1 / len(caps)) < 1e-9


def test_the_ceilings_real_and_reconstructed(shapes):
    m = tokenloom.create("metric", "prompt-alignment")
    tok = tokenloom.create("tokenizer", "pixel", bits=1, pool=4, image_shape=(3, 32, 32))
    rec = tok.decode(tok.encode(shapes.images))
    ctx = tokenloom.MetricContext(generated=shapes.images, real=shapes.images, reconstructed=rec, data=shapes,
                                  generated_conditions=conditions(shapes))
    v = m.compute(ctx).values
    assert v["prompt_alignment_real"] == v["prompt_alignment"]  # the same images against the same captions
    assert v["prompt_alignment_reconstructed"] < v["prompt_alignment_real"]  # 4×4 pooling blurs the shapes


def test_class_only_prompts_and_unparsed_prompts(shapes):
    by_class = score(shapes, labels=shapes.labels).values
    assert by_class["prompt_class_ok"] == by_class["prompt_alignment"] >= 0.9
    assert by_class["prompt_count_ok"] is None and by_class["prompt_colour_ok"] is None
    r = score(shapes, conditions(shapes, ["a cat"] * len(shapes)))
    assert r.values["prompt_alignment"] is None and r.card["n_unparsed"] == len(shapes)


def test_none_on_other_data_and_clear_errors(shapes):
    digits = load_dataset(DataConfig(name="digits", size=16, n=8, n_holdout=8, channels=3), split="holdout")
    r = score(digits, labels=digits.labels)
    assert all(v is None for v in r.values.values()) and "not `shapes`" in r.card["not_applicable"]
    with pytest.raises(tokenloom.InputError, match="generated_conditions for"):
        score(shapes, conditions(shapes)[:3])
    with pytest.raises(tokenloom.InputError):
        score(shapes, conditions(shapes), images=shapes.images * 3)
