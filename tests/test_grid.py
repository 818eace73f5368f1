"""Ablation grid expansion: axes, sweeps, exclusions, skipped cells."""

from __future__ import annotations

import pytest

import tokenloom
from tokenloom.grid import expand_grid

BASE = {
    "seed": 0,
    "tokenizer": {"name": "pixel", "bits": 2},
    "sampler": [{"name": "temperature", "t": 1.0}, {"name": "top-k", "k": 8}],
}


def test_cartesian_product_with_sweeps_and_exclusions():
    raw = {
        **BASE,
        "grid": {
            "tokenizer": [{"name": "pixel", "bits": 1}, {"name": "pixel", "bits": 2, "pool": 2}],
            "seed": [0, 1],
            "sweep": {"sampler.top-k.k": [4, 16, 32], "train.steps": [5]},
            "exclude": [{"tokenizer": {"bits": 1}, "sampler.top-k.k": 32}],
        },
    }
    base, cells, skipped = expand_grid(raw)
    assert "grid" not in base and not skipped
    assert len(cells) == 2 * 2 * 3 - 2  # bits=1 with k=32 excluded for both seeds
    ks = sorted({(c.config["tokenizer"]["bits"], c.config["sampler"][1]["k"], c.config["seed"]) for c in cells})
    assert (1, 32, 0) not in ks and (2, 32, 1) in ks
    assert all(c.config["train"]["steps"] == 5 for c in cells)
    assert all(c.config["sampler"][0] == {"name": "temperature", "t": 1.0} for c in cells)
    assert len({c.id for c in cells}) == len(cells)
    assert cells[0].labels["sampler.top-k.k"] in {"4", "16", "32"}


def test_sweep_that_does_not_apply_is_skipped_with_its_reason():
    raw = {**BASE, "grid": {"sampler": [[{"name": "top-k", "k": 3}], [{"name": "greedy"}]],
                            "sweep": {"sampler.top-k.k": [2, 4]}}}
    _, cells, skipped = expand_grid(raw)
    assert len(cells) == 2 and len(skipped) == 2
    assert all("no 'top-k'" in s.reason for s in skipped)


def test_grid_problems_are_reported_together():
    raw = {**BASE, "grid": {"tokeniser": [{"name": "x"}], "seed": ["a"], "sampler": [{"name": "top-k"}],
                            "exclude": [{"colour": 1}]}}
    with pytest.raises(tokenloom.ConfigError) as exc:
        expand_grid(raw)
    problems = exc.value.problems
    assert any(p.startswith("grid.tokeniser: unknown axis") for p in problems)
    assert any(p.startswith("grid.seed[0]: expected an int") for p in problems)
    assert any(p.startswith("grid.sampler[0]: expected a list of sampler tables") for p in problems)
    assert any(p.startswith("grid.exclude[0].colour") for p in problems)


def test_no_grid_is_one_cell():
    _, cells, skipped = expand_grid(dict(BASE))
    assert len(cells) == 1 and not skipped and cells[0].config["tokenizer"]["bits"] == 2
