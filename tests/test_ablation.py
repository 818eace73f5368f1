"""Ablations end to end on tiny grids (8-px shapes, a few training steps):
the plan, skipped cells, shared stages, the report, resumption after a kill,
a corrupt checkpoint, and the report helpers against independent references."""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_config_toml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tokenloom.ablation import plan_grid, run_ablation
from tokenloom.checkpoint import load_tensors
from tokenloom.reports import TIMING_KEYS, best_rows, direction, mean_std, pareto_front

BASE = tiny_config_toml(n_holdout=24, steps="{steps}", n_samples="{n_samples}")

GRID = """
[grid]
tokenizer = [{name = "pixel", bits = 1, pool = 2}, {name = "pixel", bits = 1, pool = 3}]
generator = [{name = "raster"}, {name = "masked", steps = 2}]
seed = [0, 1]
"""


def write_grid(tmp_path, grid=GRID, steps=4, n_samples=8, name="grid.toml"):
    path = tmp_path / name
    path.write_text(BASE.format(steps=steps, n_samples=n_samples) + grid)
    return path


def strip_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}


def models_in(cache) -> list:
    return sorted(p for p in cache.glob("model-*.safetensors") if not p.name.endswith(".train.safetensors"))


def test_tiny_grid_end_to_end_skips_the_incompatible_cell_and_shares_stages(tmp_path, monkeypatch):
    grid, out = write_grid(tmp_path), tmp_path / "out"
    lines: list[str] = []
    run_ablation(grid, out, progress=False, echo=lines.append)

    # the plan comes first, from the cache keys: seeds 0/1 give 2 tokenizers; raster and masked models per seed
    assert lines[0].startswith("grid.toml: 2 tokenizers, 4 models, 4 generation cells (2 seeds → 2 table rows)")
    text = "\n".join(lines)
    assert text.index("pool=3") < text.index("[1/4]")  # skipped cells listed before anything runs
    assert text.count("does not divide the image size") == 4
    assert len(list((out / "cache").glob("tokenizer-*.safetensors"))) == 2
    assert len(models_in(out / "cache")) == 4

    data = json.loads((out / "results.json").read_text())
    assert [s["reason"] for s in data["skipped"]] == ["tokenizer: pool = 3 does not divide the image size 8×8"] * 4
    assert len(data["runs"]) == 4 and not data["pending"]
    rows = {r["labels"]["generator"]: r for r in data["rows"]}
    assert set(rows) == {"raster", "masked(steps=2)"}
    for label, row in rows.items():
        assert sorted(row["seeds"]) == [0, 1]
        runs = [r for r in data["runs"] if r["id"] in row["runs"]]
        nll = [r["metrics"]["nll_bits_per_image"] for r in runs]
        if label == "raster":  # mean and sample std over the two seeds, checked against statistics
            assert row["metrics"]["nll_bits_per_image"]["mean"] == pytest.approx(statistics.fmean(nll))
            assert row["metrics"]["nll_bits_per_image"]["std"] == pytest.approx(statistics.stdev(nll))
            assert row["metrics"]["nfe"] == {"mean": 16.0, "std": 0.0, "n": 2}
        else:
            assert nll == [None, None] and row["metrics"]["nll_bits_per_image"]["n"] == 0
            assert row["metrics"]["nfe"]["mean"] == 2.0
        assert (out / row["samples"]).is_file()
    assert data["best"]["nfe"] == [rows["masked(steps=2)"]["id"]]

    md = (out / "results.md").read_text()
    assert "| # | tokenizer | generator | seeds |" in md and "nfe ↓" in md
    assert "**2 ± 0**" in md and " ± " in md
    assert "## Skipped cells" in md and "pool = 3 does not divide" in md
    for rel in data["plots"] + [data["overview"]]:
        with Image.open(out / rel) as im:
            assert im.format == "PNG" and im.width > 100
    assert "plots/nll_bits_per_image-vs-nfe.png" not in data["plots"]  # one row has no likelihood: no plot
    for r in data["runs"]:
        assert (out / r["artifacts"]["samples"]).is_file()

    # the same command again: every cell is finished, nothing runs
    from tokenloom import pipeline

    def boom(*a, **k):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(pipeline, "run", boom)
    lines.clear()
    again = run_ablation(grid, out, progress=False, echo=lines.append, plots=False)
    assert any("4 of 4 cells already finished" in ln for ln in lines)
    assert [strip_timing(r["metrics"]) for r in again["runs"]] == [strip_timing(r["metrics"]) for r in data["runs"]]


def test_plan_counts_shared_models_and_rejects_an_empty_grid(tmp_path):
    from tokenloom.config import read_toml

    sweep = '[grid]\ngenerator = [{name = "masked", steps = 2}, {name = "masked", steps = 4}]\n' \
            '[grid.sweep]\n"sampler.top-k.k" = [2, 3, 4]\n'
    plan = plan_grid(read_toml(write_grid(tmp_path, sweep)))
    assert plan.summary() == "1 tokenizer, 1 model, 6 generation cells"  # steps and k do not change the model
    bad = '[grid]\ntokenizer = [{name = "pixel", pool = 3}]\n'
    with pytest.raises(Exception, match="no cell can run"):
        run_ablation(write_grid(tmp_path, bad, name="bad.toml"), tmp_path / "o", progress=False, echo=lambda m: None)
    assert not (tmp_path / "o" / "cache").exists()


KILL_GRID = """
[grid]
generator = [{name = "raster"}, {name = "random"}]
"""


def test_a_killed_ablation_resumes_and_matches_an_uninterrupted_one(tmp_path, cli_env):
    grid = write_grid(tmp_path, KILL_GRID, steps=300)
    straight = run_ablation(grid, tmp_path / "a", progress=False, echo=lambda m: None, plots=False)

    b = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "tokenloom", "ablate", str(grid), "--out", str(b), "--no-progress"],
                            env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_in_training = False
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            # the first cell is finished and the second one's backbone is training
            if list((b / "cells").glob("*.json")) and list((b / "cache").glob("model-*.train.safetensors")):
                proc.send_signal(signal.SIGKILL)
                killed_in_training = True
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None and not killed_in_training:
            proc.kill()
        proc.wait()
    assert killed_in_training, "the ablation finished before it could be killed mid-training"
    for f in (b / "cache").glob("*.safetensors"):  # nothing half-written where a reader looks: every hash checks
        load_tensors(f)

    lines: list[str] = []
    resumed = run_ablation(grid, b, progress=False, echo=lines.append, plots=False)
    assert any("1 of 2 cells already finished" in ln for ln in lines)
    (late,) = [r for r in resumed["runs"] if r["components"]["generator"] == "random"]
    assert late["train"]["resumed_from"] > 0
    assert [r["id"] for r in resumed["runs"]] == [r["id"] for r in straight["runs"]]
    for x, y in zip(straight["runs"], resumed["runs"]):
        assert strip_timing(x["metrics"]) == strip_timing(y["metrics"])
    for f in (tmp_path / "a" / "cache").glob("*.safetensors"):  # the same weights and samples, bit for bit
        ta, tb = load_tensors(f)[0], load_tensors(b / "cache" / f.name)[0]
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), f.name


def test_a_corrupt_checkpoint_is_reported_and_recomputed(tmp_path, capsys):
    grid = write_grid(tmp_path, '[grid]\ngenerator = [{name = "raster"}]\n')
    out = tmp_path / "out"
    run_ablation(grid, out, progress=False, echo=lambda m: None, plots=False)
    (model,) = models_in(out / "cache")
    good = {k: v.clone() for k, v in load_tensors(model)[0].items()}  # not a view of the file
    raw = bytearray(model.read_bytes())
    raw[-8:] = bytes(b ^ 0xFF for b in raw[-8:])  # flip bytes of the last tensor
    model.write_bytes(bytes(raw))
    for f in (out / "cells").glob("*.json"):
        f.unlink()  # the cell must run again and load its model
    capsys.readouterr()
    report = run_ablation(grid, out, progress=True, echo=lambda m: None, plots=False)
    err = capsys.readouterr().err
    assert "corrupt checkpoint" in err and "recomputing" in err
    assert (model.parent / (model.name + ".corrupt")).is_file()
    again = load_tensors(model)[0]
    assert all(torch.equal(good[k], again[k]) for k in good)
    assert report["runs"][0]["cache"]["model_reused"] is False


# ---------------------------------------------------------------------------
# Report helpers against independent references
# ---------------------------------------------------------------------------


def test_directions_follow_the_table():
    lower = ["fid", "kid", "nll_bits_per_image", "nfe", "seconds_per_image", "mse", "peak_memory_bytes"]
    higher = ["isc", "precision", "recall", "shapes_valid", "psnr", "tokens_per_second", "acceptance_rate"]
    assert all(direction(k) == "lower" for k in lower)
    assert all(direction(k) == "higher" for k in higher)
    assert direction("kid_std") is None and direction("uniform_bits_per_image") is None
    assert direction("shapes_valid_real") is None and direction("something_new") is None


@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=12))
def test_mean_std_matches_statistics(xs):
    m = mean_std(xs + [None])
    assert m["n"] == len(xs)
    assert m["mean"] == pytest.approx(statistics.fmean(xs), rel=1e-9, abs=1e-6)
    if len(xs) > 1:
        assert m["std"] == pytest.approx(statistics.stdev(xs), rel=1e-6, abs=1e-6)
    else:
        assert m["std"] is None


@settings(max_examples=60)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=10), st.booleans())
def test_pareto_front_against_brute_force(points, higher):
    costs = [float(c) for c, _ in points]
    quals = [float(q) for _, q in points]
    front = pareto_front(costs, quals, higher_is_better=higher)

    def better_or_equal(a, b):  # quality a at least as good as b
        return a >= b if higher else a <= b

    for i in range(len(points)):
        dominated = False
        for j in range(len(points)):
            if j != i and costs[j] <= costs[i] and better_or_equal(quals[j], quals[i]) and \
                    (costs[j] < costs[i] or quals[j] != quals[i]):
                dominated = True
        assert front[i] == (not dominated)
    assert any(front)  # the cheapest of the best is always on the front


def test_best_rows_marks_ties_and_skips_uninformative_columns():
    def row(rid, **m):
        return {"id": rid, "metrics": {k: {"mean": v, "std": None, "n": 1} for k, v in m.items()}}

    rows = [row("a", fid=3.0, nfe=4.0, isc=1.0, kid_std=0.1), row("b", fid=2.0, nfe=4.0, isc=2.0, kid_std=0.0),
            row("c", fid=2.0, nfe=4.0, isc=None, kid_std=0.2)]
    best = best_rows(rows)
    assert best["fid"] == ["b", "c"] and best["isc"] == ["b"]
    assert "nfe" not in best and "kid_std" not in best  # all equal; no direction


def test_the_shipped_example_grid_plans_as_documented():
    from pathlib import Path

    from tokenloom.ablation import load_plan

    plan = load_plan(Path(__file__).resolve().parents[1] / "examples" / "ablation-small.toml")
    assert plan.summary() == "2 tokenizers, 6 models, 20 generation cells (2 seeds → 10 table rows); 4 skipped"
    assert all("next-scale needs a multi-scale tokenizer" in s.reason for s in plan.skipped)


def test_planning_builds_each_cell_s_components_once(tmp_path, monkeypatch):
    import tokenloom
    from tokenloom.config import read_toml

    reg = tokenloom.get_registry()
    built: list[str] = []
    for kind, name in (("tokenizer", "pixel"), ("generator", "raster"), ("generator", "masked")):
        cls = reg.get(kind, name).cls
        original = cls.__init__

        def counted(self, *a, _original=original, _name=name, **k):
            built.append(_name)
            _original(self, *a, **k)

        monkeypatch.setattr(cls, "__init__", counted)
    plan = plan_grid(read_toml(write_grid(tmp_path)), registry=reg)
    # 8 cells; the 4 with pool = 3 (on 8 px) fail at their tokenizer: 8 tokenizers, 4 generators built
    assert len(plan.cells) == 4 and len(plan.skipped) == 4
    assert built.count("pixel") == 8 and built.count("raster") + built.count("masked") == 4


def test_the_grid_labels_live_in_grid_and_ablation_reexports_them():
    from tokenloom import ablation, grid

    assert ablation.SEED_AXIS is grid.SEED_AXIS == "seed"
    assert ablation.describe_labels is grid.describe_labels
    assert grid.describe_labels({"tokenizer": "vq", "seed": "1"}, skip=(grid.SEED_AXIS,)) == "tokenizer=vq"
    assert grid.describe_labels({}) == "base"


def test_prompt_alignment_columns_have_a_direction():
    """prompt-alignment's rates are results (higher is better) and get best-marks; its ceilings on real
    images and on the tokenizer's reconstructions describe the data and the tokenizer, and never do."""
    from tokenloom.reports import QUALITY_KEYS, direction

    for key in ("prompt_alignment", "prompt_count_ok", "prompt_class_ok", "prompt_colour_ok",
                "prompt_alignment_seen", "prompt_alignment_unseen"):
        assert direction(key) == "higher", key
    assert direction("prompt_alignment_real") is None
    assert direction("prompt_alignment_reconstructed") is None
    assert "prompt_alignment" in QUALITY_KEYS
