"""Compositional generalisation: ``[data] holdout_combos`` leaves chosen (class, colour, count)
combinations out of the shapes training split, and prompt-alignment scores the prompts asking
for them (unseen) apart from the others (seen)."""

from __future__ import annotations

import attrs
import pytest

import tokenloom
from tokenloom.config import STREAM_OPTIONS, DataConfig, config_to_dict, parse_config
from tokenloom.data import combo_matches, load_dataset, parse_combo
from tokenloom.running.cache import data_key, stable_hash


def test_parse_combo_and_its_errors():
    assert parse_combo("red square") == {"colour": "red", "class": "square"}
    assert parse_combo("three triangles") == {"count": 3, "class": "triangle"}
    assert parse_combo("2 blue") == {"count": 2, "colour": "blue"}
    with pytest.raises(tokenloom.ConfigError, match="'purple' in 'purple square' is not a count, colour"):
        parse_combo("purple square")
    with pytest.raises(tokenloom.ConfigError, match="names no count"):
        parse_combo("a and")


def test_the_training_split_leaves_the_combinations_out_and_the_holdout_keeps_them():
    cfg = DataConfig(name="shapes", size=8, n=400, n_holdout=200, holdout_combos=("red square", "3 triangles"))
    train, held = load_dataset(cfg, split="train"), load_dataset(cfg, split="holdout")
    combos = [parse_combo(c) for c in cfg.holdout_combos]
    assert not any(combo_matches(c, a) for a in train.attributes for c in combos)
    assert sum(any(combo_matches(c, a) for c in combos) for a in held.attributes) > 10
    plain = load_dataset(attrs.evolve(cfg, holdout_combos=()), split="train")
    assert len(train) == sum(not any(combo_matches(c, a) for c in combos) for a in plain.attributes) < 400
    assert held.holdout_combos == cfg.holdout_combos
    with pytest.raises(tokenloom.ConfigError, match="only the shapes data set"):
        load_dataset(DataConfig(name="digits", size=8, n=40, n_holdout=8, holdout_combos=("red",)))


def test_configs_without_it_keep_their_keys_and_ids():
    cfg = parse_config({"generator": {"name": "raster"}})
    old = attrs.asdict(cfg.data)
    del old["holdout_combos"]
    for k in STREAM_OPTIONS:  # the streamed sets' options (issue 15) are absent from the key at their defaults
        del old[k]
    assert data_key(cfg) == stable_hash(old) and "holdout_combos" not in config_to_dict(cfg)["data"]
    with_it = parse_config({"generator": {"name": "raster"}, "data": {"holdout_combos": ["red square"]}})
    assert data_key(with_it) != data_key(cfg) and config_to_dict(with_it)["data"]["holdout_combos"] == ["red square"]
    assert parse_config(config_to_dict(with_it)) == with_it


def test_prompt_alignment_scores_unseen_combinations_apart():
    cfg = DataConfig(name="shapes", size=32, n=8, n_holdout=64, holdout_combos=("red square",))
    held = load_dataset(cfg, split="holdout")
    conds = [tokenloom.Condition(caption=c) for c in held.captions]
    r = tokenloom.create("metric", "prompt-alignment").compute(
        tokenloom.MetricContext(generated=held.images, data=held, generated_conditions=conds))
    n_unseen = sum(combo_matches(parse_combo("red square"), a) for a in held.attributes)
    assert r.card["n_unseen"] == n_unseen > 0
    assert r.values["prompt_alignment_unseen"] is not None and r.values["prompt_alignment_seen"] is not None
