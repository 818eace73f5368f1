"""End to end on tiny configs (8-px shapes, a few training steps): files
written, NFE per order, caches reused across runs, resumption after a kill,
the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_config_toml
from PIL import Image

import tokenloom
from tokenloom.checkpoint import load_tensors
from tokenloom.cli import cli
from tokenloom.config import load_config
from tokenloom.pipeline import demo_config, region_mask, run

TOML = tiny_config_toml(generator="{generator}", generator_extra="{generator_extra}", samplers="{samplers}\n")

TOPK = '[[sampler]]\nname = "top-k"\nk = 3\n'
CFG = '[[sampler]]\nname = "cfg"\nscale = 2.0\n' + TOPK


def write(tmp_path, name="raster", extra="", samplers=TOPK, file=None):
    path = tmp_path / (file or f"{name}.toml")
    path.write_text(TOML.format(generator=name, generator_extra=extra, samplers=samplers))
    return path


def test_run_writes_results_samples_and_reuses_caches(tmp_path):
    out = tmp_path / "out"
    rec = run(load_config(write(tmp_path)), out, progress=False)
    assert rec["metrics"]["nfe"] == 16  # raster: L = 4×4
    assert rec["metrics"]["seconds_per_image"] > 0 and rec["metrics"]["tokens_per_second"] > 0
    assert rec["metrics"]["uniform_bits_per_image"] == pytest.approx(16 * 3)
    assert 0 < rec["metrics"]["nll_bits_per_image"] < 100
    for key in ("nfe", "seconds_per_image", "tokens_per_second", "peak_memory_bytes", "kv_cache_bytes",
                "train_tokens", "train_flops"):
        assert rec["stats"][key] is not None and rec["stats"][key] >= 0, key
    assert rec["stats"]["train_tokens"] == 4 * 8 * 16
    # k+v, layers, rows (a full micro-batch of 16: the 8 samples and 8 extras), heads, L, hd, fp32
    assert rec["stats"]["kv_cache_bytes"] == 2 * 1 * 16 * 2 * 16 * 8 * 4
    data = json.loads((out / "results.json").read_text())
    assert data["tokenloom_version"] == tokenloom.__version__
    (r,) = data["runs"]
    assert r["id"] == rec["id"] and r["components"] == {"tokenizer": "pixel", "generator": "raster",
                                                        "sampler": ["top-k"], "metrics": ["nll", "cost"]}
    assert set(r["eval_cards"]) == {"nll", "cost"}
    png = out / r["artifacts"]["samples"]
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 8 * 8
    assert rec["id"] in (out / "results.md").read_text()
    assert not rec["cache"]["tokenizer_reused"] and not rec["cache"]["model_reused"]

    # a changed sampler chain reuses tokenizer and model; the table gets a second row
    rec2 = run(load_config(write(tmp_path, samplers=CFG, file="cfg.toml")), out, progress=False)
    assert rec2["cache"]["tokenizer_reused"] and rec2["cache"]["model_reused"]
    assert rec2["id"] != rec["id"] and rec2["stats"]["train_tokens"] == rec["stats"]["train_tokens"]
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 2

    # other orders share the tokenizer, train their own backbone, and cost L, L and T passes
    rnd = run(load_config(write(tmp_path, "random")), out, progress=False)
    msk = run(load_config(write(tmp_path, "masked", extra="steps = 3")), out, progress=False)
    assert rnd["cache"]["tokenizer_reused"] and msk["cache"]["tokenizer_reused"]
    assert not rnd["cache"]["model_reused"] and rnd["cache"]["model"] != rec["cache"]["model"]
    assert rnd["metrics"]["nfe"] == 16 and msk["metrics"]["nfe"] == 3
    assert rnd["metrics"]["nll_bits_per_image"] is not None and msk["metrics"]["nll_bits_per_image"] is None
    assert len(list((out / "cache").glob("tokenizer-*.safetensors"))) == 1


def test_inpainting_run_shows_the_known_region(tmp_path):
    out = tmp_path / "out"
    plain = run(load_config(write(tmp_path, "random")), out, progress=False)
    inpaint = run(load_config(write(tmp_path, "random")), out, progress=False, region="center")
    assert inpaint["cache"]["model_reused"] and inpaint["id"] != plain["id"] and inpaint["region"] == "center"
    with Image.open(out / plain["artifacts"]["samples"]) as a, Image.open(out / inpaint["artifacts"]["samples"]) as b:
        assert b.height > a.height  # a row of known context above each row of samples
    samples = max((out / "cache").glob("samples-*.safetensors"), key=lambda p: p.stat().st_mtime)
    codes = load_tensors(samples)[0]["codes"]
    from tokenloom.running.codestore import CodeStore

    store = next((out / "cache").glob("codes-*"))  # the code store of the run's tokenizer
    held = CodeStore(store, json.loads((store / "store.json").read_text())["key"]).read("holdout").tensor()
    keep = region_mask(tokenloom.TokenLayout(scales=((4, 4),)), "center")
    assert keep.sum() == 12 and not keep[5] and keep[0]
    assert torch.equal(codes[:, keep], held[:8, keep])  # every known token kept


def test_region_needs_a_generator_that_supports_it(tmp_path):
    with pytest.raises(tokenloom.ConfigError, match="does not support known"):
        run(load_config(write(tmp_path)), tmp_path / "out", progress=False, region="left")
    assert not list((tmp_path / "out" / "cache").glob("model-*"))  # refused before training


def test_a_killed_run_resumes_and_matches_an_uninterrupted_one(tmp_path, monkeypatch):
    from tokenloom.plugins.generators.raster import RasterGenerator

    cfg = load_config(write(tmp_path))
    straight = run(cfg, tmp_path / "a", progress=False)

    original = RasterGenerator.on_train_step

    def die_at_step_3(self, step, n_steps):
        if step == 3:
            raise KeyboardInterrupt  # the process is killed in step 3
        original(self, step, n_steps)

    monkeypatch.setattr(RasterGenerator, "on_train_step", die_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "b", progress=False)
    assert list((tmp_path / "b" / "cache").glob("model-*.train.safetensors"))
    monkeypatch.setattr(RasterGenerator, "on_train_step", original)
    resumed = run(cfg, tmp_path / "b", progress=False)
    assert resumed["cache"]["tokenizer_reused"] and resumed["train"]["resumed_from"] == 3
    a = load_tensors(next((tmp_path / "a" / "cache").glob("model-*.safetensors")))[0]
    b = load_tensors(next((tmp_path / "b" / "cache").glob("model-*.safetensors")))[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["id"] == straight["id"]


def test_cli_run_prints_the_table_and_errors_cleanly(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["run", str(write(tmp_path)), "--out", str(tmp_path / "o"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "| raster-" in res.output and "results.md" in res.output and "samples/" in res.output
    res = runner.invoke(cli, ["run", str(write(tmp_path)), "--out", str(tmp_path / "o"), "--region", "top",
                              "--no-progress"])
    assert res.exit_code == 2 and "does not support known" in res.output and "Traceback" not in res.output
    bad = tmp_path / "bad.toml"
    bad.write_text(TOML.format(generator="rastr", generator_extra="", samplers=TOPK))
    res = runner.invoke(cli, ["run", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "did you mean 'raster'" in res.output


def test_demo_config_is_a_valid_small_run():
    cfg, _note = demo_config()
    assert cfg.data.name == "shapes" and cfg.generator.name == "raster"
    assert [s.name for s in cfg.sampler] == ["top-p"]
    assert cfg.tokenizer.name in ("vq", "pixel") and "nll" in [m.name for m in cfg.metrics]


def _count_calls(monkeypatch, cls, name, calls):
    original = getattr(cls, name)

    def counted(self, *args, **kwargs):
        calls.append((cls.__name__, name, args, kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, counted)


def test_a_run_builds_each_component_once_and_scores_the_heldout_codes_once(tmp_path, monkeypatch):
    reg = tokenloom.get_registry()
    calls: list = []
    for kind, name in (("tokenizer", "pixel"), ("generator", "raster"), ("sampler", "top-k")):
        _count_calls(monkeypatch, reg.get(kind, name).cls, "__init__", calls)
    _count_calls(monkeypatch, reg.get("generator", "raster").cls, "log_likelihood", calls)
    rec = run(load_config(write(tmp_path)), tmp_path / "out", progress=False)
    built = [c[0] for c in calls if c[1] == "__init__"]
    assert sorted(built) == sorted({c[0] for c in calls if c[1] == "__init__"}) and len(built) == 3, built
    # 16 held-out images, one batch of 64: scored by the pipeline, and the nll metric reuses the number
    assert len([c for c in calls if c[1] == "log_likelihood"]) == 1
    assert rec["metrics"]["nll_bits_per_image"] == rec["nll"]["nll_bits_per_image"]
    assert rec["metrics"]["nll_bits_per_token"] == pytest.approx(rec["nll"]["nll_bits_per_token"], rel=1e-12)
    assert "ctx.stats" in rec["eval_cards"]["nll"]["source"]


def test_the_nll_metric_scores_the_codes_itself_on_a_subset(tmp_path, monkeypatch):
    reg = tokenloom.get_registry()
    calls: list = []
    _count_calls(monkeypatch, reg.get("generator", "raster").cls, "log_likelihood", calls)
    path = write(tmp_path)
    path.write_text(path.read_text() + "[metrics.nll]\nmax_images = 8\n")
    rec = run(load_config(path), tmp_path / "out", progress=False)
    assert len(calls) == 2  # the pipeline's held-out NLL, then the metric's own on its 8 images
    assert rec["eval_cards"]["nll"]["n_images"] == 8 and rec["eval_cards"]["nll"]["source"] == "held-out codes (ctx.codes)"
    assert rec["metrics"]["nll_bits_per_image"] != rec["nll"]["nll_bits_per_image"]


def test_run_and_fit_tokenizer_fit_through_the_same_resumable_path(tmp_path, monkeypatch):
    from tokenloom.tokenizer_fit import fit_tokenizer_run

    cls = tokenloom.get_registry().get("tokenizer", "pixel").cls
    calls: list = []
    _count_calls(monkeypatch, cls, "fit_resumable", calls)
    cfg = load_config(write(tmp_path))
    run(cfg, tmp_path / "run", progress=False)
    fit_tokenizer_run(cfg, tmp_path / "fit", progress=False)
    assert [c[3]["checkpoint"].parent.name for c in calls] == ["cache", "fit"]
    assert calls[1][3]["checkpoint"].name == "train_state.safetensors"
    run(cfg, tmp_path / "run", progress=False)  # cached: not fitted again
    assert len(calls) == 2


def test_format_number_is_the_one_table_format():
    from tokenloom.running.results import format_number

    assert [format_number(v) for v in (None, float("nan"), 0, 0.0, 16, 3.14159, 123456.0, 0.0001234, -2e-4, "x")] \
        == ["–", "nan", "0", "0", "16", "3.142", "1.235e+05", "1.234e-04", "-2.000e-04", "x"]


def test_grid_writer_layout_and_the_report_reads_its_first_row(tmp_path):
    from tokenloom.reports import first_row_of_grid
    from tokenloom.running.images import GRID_NCOL, GRID_PAD, grid_image, save_grid

    imgs = torch.linspace(-1, 1, 11 * 3 * 8 * 8).reshape(11, 3, 8, 8)
    save_grid(tmp_path / "g.png", imgs, min_cell=16)  # 8 px -> 2× = 16 px cells, 8 columns, 2 rows
    with Image.open(tmp_path / "g.png") as im:
        assert im.size == (GRID_NCOL * (16 + GRID_PAD) + GRID_PAD, 2 * (16 + GRID_PAD) + GRID_PAD)
        a = torch.from_numpy(__import__("numpy").asarray(im.convert("RGB")).copy())
    assert int(a[0, 0, 0]) == 255 and int(a[-1, -1, 0]) == 255  # white padding; an empty cell stays white
    first = torch.from_numpy(first_row_of_grid(tmp_path / "g.png").copy())
    assert first.shape[0] == 16 + 2 * GRID_PAD and torch.equal(first, a[: first.shape[0]])
    cell = ((imgs[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
    assert torch.equal(a[GRID_PAD : GRID_PAD + 16 : 2, GRID_PAD : GRID_PAD + 16 : 2], cell)
    grey = grid_image([imgs[:2], imgs[:3]], scale=1, background=128)  # rows of unequal length
    assert grey.size == (3 * (8 + GRID_PAD) + GRID_PAD, 2 * (8 + GRID_PAD) + GRID_PAD)
    assert grey.getpixel((GRID_PAD + 2 * (8 + GRID_PAD), GRID_PAD)) == (128, 128, 128)


def test_one_hash_for_cache_keys_and_grid_cells():
    from tokenloom.grid import expand_grid
    from tokenloom.pipeline import stable_hash

    _base, cells, _ = expand_grid({"seed": 0, "grid": {"seed": [1, 2]}})
    assert [c.id for c in cells] == [stable_hash(c.config, 8) for c in cells]
    assert stable_hash({"b": 1, "a": [1, 2]}) == stable_hash({"a": [1, 2], "b": 1})
    assert len(stable_hash("x")) == 16 and stable_hash("x", 8) == stable_hash("x")[:8]
