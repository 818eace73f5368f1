"""Fault injection (issue 14): corrupt and truncated files, kills between
writes, file names that would leave the output directory, read-only output.

Every fault must give one clear message and lose nothing: a corrupt file is
reported, moved aside and recomputed (or rebuilt), and the final numbers are
the ones an undisturbed run gives. Runs are tiny (8-px shapes, a few
training steps); the subprocess kill tests are marked slow.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config_toml

from tokenloom.ablation import cell_path, plan_grid, run_ablation
from tokenloom.config import load_config
from tokenloom.errors import InputError
from tokenloom.pipeline import run
from tokenloom.running.results import inside, read_runs, safe_name

REPO = Path(__file__).resolve().parents[1]

TOML = tiny_config_toml(n=48, steps="{steps}", k="{k}")

DETERMINISTIC = ("nll_bits_per_image", "nfe", "uniform_bits_per_image")


def config(tmp_path: Path, *, k: int = 3, steps: int = 4, name: str | None = None) -> Path:
    path = tmp_path / (name or f"k{k}-s{steps}.toml")
    path.write_text(TOML.format(k=k, steps=steps))
    return path


def same_numbers(a: dict, b: dict) -> None:
    for key in DETERMINISTIC:
        assert a["metrics"][key] == b["metrics"][key], key
    assert a["train"]["final_loss"] == b["train"]["final_loss"]


# ---------------------------------------------------------------------------
# results.json: never silently truncated
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "not-json", "not-utf8", "wrong-shape"])
def test_a_corrupt_results_json_is_moved_aside_and_rebuilt_from_the_records(tmp_path, capsys, damage):
    out = tmp_path / "out"
    first = run(load_config(config(tmp_path, k=3)), out, progress=False)
    second = run(load_config(config(tmp_path, k=2)), out, progress=False)
    results = out / "results.json"
    text = results.read_bytes()
    assert len(json.loads(text)["runs"]) == 2
    assert sorted(p.name for p in (out / "records").iterdir()) == sorted(
        [f"{first['id']}.json", f"{second['id']}.json"])
    results.write_bytes({"truncated": text[: len(text) // 2], "not-json": b"\x00\x01garbage",
                         "not-utf8": b"\xff\xfe\x00{", "wrong-shape": b'{"runs": 3}'}[damage])
    capsys.readouterr()
    third = run(load_config(config(tmp_path, k=4)), out, progress=False)
    err = capsys.readouterr().err
    assert "results.json" in err and "moved aside to results.json.corrupt" in err and "rebuilding" in err
    assert (out / "results.json.corrupt").read_bytes() != text  # the damaged copy is kept as it was
    runs = json.loads(results.read_text())["runs"]
    assert [r["id"] for r in runs] == [first["id"], second["id"], third["id"]]  # nothing lost, order kept
    for before, after in zip((first, second), runs):
        assert after["metrics"] == json.loads(json.dumps(before["metrics"]))
    assert all(r["id"] in (out / "results.md").read_text() for r in runs)


def test_a_second_corruption_never_overwrites_the_first_copy(tmp_path, capsys):
    out = tmp_path / "out"
    rec = run(load_config(config(tmp_path)), out, progress=False)
    (out / "results.json").write_text("{")
    assert [r["id"] for r in read_runs(out)] == [rec["id"]]
    (out / "results.json").write_text("[")
    assert [r["id"] for r in read_runs(out)] == [rec["id"]]
    assert (out / "results.json.corrupt").read_text() == "{"
    assert (out / "results.json.corrupt.1").read_text() == "["
    assert capsys.readouterr().err.count("moved aside") == 2


def test_a_run_killed_between_its_record_and_results_json_keeps_its_row(tmp_path):
    out = tmp_path / "out"
    first = run(load_config(config(tmp_path, k=3)), out, progress=False)
    lost = run(load_config(config(tmp_path, k=2)), out, progress=False, write_report=False)
    # the record of a run that was killed right after writing records/<id>.json
    from tokenloom.checkpoint import write_json

    write_json(out / "records" / f"{lost['id']}.json", lost)
    assert [r["id"] for r in read_runs(out)] == [first["id"], lost["id"]]


def test_a_corrupt_run_record_is_reported_and_moved_aside(tmp_path, capsys):
    out = tmp_path / "out"
    rec = run(load_config(config(tmp_path)), out, progress=False)
    path = out / "records" / f"{rec['id']}.json"
    path.write_text('{"id": ')
    assert [r["id"] for r in read_runs(out)] == [rec["id"]]  # results.json still has the row
    assert "moved aside" in capsys.readouterr().err and path.with_name(path.name + ".corrupt").is_file()


# ---------------------------------------------------------------------------
# Training: no NaN for a loss that was computed
# ---------------------------------------------------------------------------


def test_a_kill_after_the_last_training_save_keeps_the_final_loss(tmp_path):
    import tokenloom
    from tokenloom.config import ModelConfig, TrainConfig
    from tokenloom.model import build_model
    from tokenloom.train import train

    tok = tokenloom.create("tokenizer", "pixel", bits=1, pool=4, image_shape=(3, 8, 12))
    gen = tokenloom.create("generator", "raster", tokenizer=tok)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 8, (32, 6), generator=g)
    labels = torch.randint(0, 3, (32,), generator=g)
    cfg = TrainConfig(steps=6, batch_size=8, warmup=1)
    ckpt = tmp_path / "state.safetensors"

    def model():
        return build_model(gen.model_spec(), ModelConfig(n_layer=1, d_model=16, n_head=2), n_classes=3, seed=1)

    first = train(model(), gen, codes, labels, cfg, seed=0, null_class=3, checkpoint=ckpt, progress=False)
    assert ckpt.is_file()  # the final model write never happened: the process was killed here
    again = train(model(), gen, codes, labels, cfg, seed=0, null_class=3, checkpoint=ckpt, progress=False)
    assert again.resumed_from == 6 and again.steps == 6
    assert again.final_loss == first.final_loss and again.final_loss == again.final_loss  # not NaN


def test_a_run_killed_before_its_final_model_write_reports_the_real_final_loss(tmp_path):
    from tokenloom.checkpoint import load_tensors, save_tensors

    cfg = load_config(config(tmp_path))
    straight = run(cfg, tmp_path / "straight", progress=False)
    cache = tmp_path / "straight" / "cache"
    (final,) = [f for f in cache.glob("model-*.safetensors") if not f.name.endswith(".train.safetensors")]
    out = tmp_path / "out"
    (out / "cache").mkdir(parents=True)
    for f in cache.iterdir():
        if f.name.startswith("tokenizer-"):
            (out / "cache" / f.name).write_bytes(f.read_bytes())
        elif f.name.startswith("codes-"):  # the code store: a directory of shards
            shutil.copytree(f, out / "cache" / f.name)
    # what a kill between the last training-state save and the final model write leaves: the
    # training state at the last step (the final weights), no final model file
    tensors, meta = load_tensors(final)
    meta = {k: v for k, v in meta.items() if k not in ("sha256", "train_record")}
    meta["last_loss"] = repr(straight["train"]["final_loss"])
    save_tensors(out / "cache" / final.name.replace(".safetensors", ".train.safetensors"), tensors, meta)
    resumed = run(cfg, out, progress=False)
    assert resumed["train"]["resumed_from"] == cfg.train.steps
    assert resumed["train"]["final_loss"] == straight["train"]["final_loss"]
    same_numbers(resumed, straight)
    assert "NaN" not in (out / "results.json").read_text()


# ---------------------------------------------------------------------------
# Ablation cell records
# ---------------------------------------------------------------------------

GRID_BASE = TOML.format(k=3, steps=3)
GRID = GRID_BASE + """
[grid]
generator = [{name = "raster"}, {name = "random"}]
"""


def test_a_corrupt_cell_record_is_reported_moved_aside_and_recomputed(tmp_path, capsys):
    out = tmp_path / "abl"
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID)
    first = run_ablation(grid, out, progress=False, echo=lambda _m: None, plots=False)
    plan = plan_grid(__import__("tomllib").loads(GRID))
    path = cell_path(out, plan.cells[0])
    path.write_text(path.read_text()[:40])
    capsys.readouterr()
    again = run_ablation(grid, out, progress=False, echo=lambda _m: None, plots=False)
    err = capsys.readouterr().err
    assert path.name in err and "moved aside" in err and "recomputing the cell" in err
    assert path.with_name(path.name + ".corrupt").is_file()
    json.loads(path.read_text())  # rewritten
    for a, b in zip(first["runs"], again["runs"]):
        for key in DETERMINISTIC:
            assert a["metrics"][key] == b["metrics"][key]


# ---------------------------------------------------------------------------
# Nothing written outside <out>
# ---------------------------------------------------------------------------


def test_safe_names_cannot_leave_their_folder(tmp_path):
    for evil in ("../../etc/passwd", "/abs/path", "..", ".hidden", "a/b\\c", "x\x00y", "", "é€"):
        name = safe_name(evil)
        assert name and "/" not in name and "\\" not in name and not name.startswith(".")
        assert (tmp_path / name).resolve().parent == tmp_path.resolve()
    assert safe_name("raster-0123abcd") == "raster-0123abcd"
    assert safe_name("pixel_bits1_pool2-masked_steps2-1a2b3c4d") == "pixel_bits1_pool2-masked_steps2-1a2b3c4d"
    with pytest.raises(InputError, match="outside the output directory"):
        inside(tmp_path / "out", tmp_path / "out" / ".." / "elsewhere.json")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "cells").symlink_to(tmp_path)
    with pytest.raises(InputError, match="outside"):
        inside(tmp_path / "out", tmp_path / "out" / "cells" / ".." / ".." / "x.json")


def test_grid_cell_ids_from_path_like_option_values_stay_inside_out(tmp_path):
    evil = GRID_BASE + """
[grid]
tokenizer = [{name = "pixel", bits = 1, pool = 2, notes = "../../../../tmp/evil"}]
"""
    raw = __import__("tomllib").loads(evil)
    from tokenloom.grid import expand_grid

    _, cells, _ = expand_grid(raw)
    (cell,) = cells
    assert "/" not in cell.id and not cell.id.startswith(".") and len(cell.id) <= 80
    long = GRID_BASE + '[grid]\ntokenizer = [{name = "pixel", bits = 1, pool = 2, x = "' + "a/" * 80 + '"}]\n'
    _, (cell,), _ = expand_grid(__import__("tomllib").loads(long))
    assert len(cell.id) <= 80 and cell.id[-8:].isalnum()  # the config hash survives truncation


# ---------------------------------------------------------------------------
# Read-only output and kills (subprocesses)
# ---------------------------------------------------------------------------


def cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokenloom", *args], check=False, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})})


def test_an_unwritable_out_is_one_message_naming_the_directory(tmp_path):
    if os.geteuid() == 0:  # root ignores file permissions; /sys refuses even root
        out, expect = Path("/sys/tokenloom-fault-test"), "not permitted"
    else:
        out, expect = tmp_path / "ro", "permission denied"
        out.mkdir()
        out.chmod(0o500)
    try:
        p = cli("run", str(config(tmp_path)), "--out", str(out), "--no-progress", cwd=tmp_path)
    finally:
        if out.is_relative_to(tmp_path):
            out.chmod(0o700)
    assert p.returncode == 3, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and str(out) in lines[0] and expect in lines[0].lower(), p.stderr
    assert "--out" in lines[0]  # the fix


@pytest.mark.parametrize(("code", "words"), [
    (errno.EACCES, ("permission denied", "permissions of")),
    (errno.EROFS, ("read-only file system", "writable file system")),
    (errno.ENOSPC, ("no space left", "free some space")),
])
def test_os_errors_are_one_line_with_the_file_and_the_fix(tmp_path, monkeypatch, code, words):
    from click.testing import CliRunner

    from tokenloom.cli import cli as tl
    from tokenloom.running import pipeline

    target = tmp_path / "out" / "cache" / ".model-abc.safetensors.x1y2.tmp"

    def fail(*_a, **_k):
        raise OSError(code, os.strerror(code), str(target))

    monkeypatch.setattr(pipeline, "run_file", fail)
    res = CliRunner().invoke(tl, ["run", str(config(tmp_path)), "--out", str(tmp_path / "out")])
    assert res.exit_code == 3
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert all(w in lines[0] for w in words) and str(target.parent) in lines[0] and ".tmp" not in lines[0]
    debug = CliRunner().invoke(tl, ["--debug", "run", str(config(tmp_path)), "--out", str(tmp_path / "out")])
    assert isinstance(debug.exception, OSError) and debug.exception.errno == code  # the traceback goes through


def test_a_config_that_is_not_utf8_and_an_internal_error_are_one_line(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from tokenloom.cli import cli as tl
    from tokenloom.running import pipeline

    bad = tmp_path / "latin1.toml"
    bad.write_bytes('seed = 0\n# café\n'.encode("latin-1"))
    for command in ("check", "run"):
        res = CliRunner().invoke(tl, [command, str(bad)])
        assert res.exit_code == 2 and "Traceback" not in res.output
        (line,) = res.output.strip().splitlines()
        assert str(bad) in line and "UTF-8" in line, line

    def bug(*_a, **_k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(pipeline, "run_file", bug)
    res = CliRunner().invoke(tl, ["run", str(config(tmp_path))])
    assert res.exit_code == 1
    (line,) = res.output.strip().splitlines()
    assert "internal error: ZeroDivisionError" in line and "--debug" in line


@pytest.mark.slow
def test_kill_9_during_a_run_then_resume_gives_the_same_numbers(tmp_path):
    cfg = config(tmp_path, steps=60)
    ref = cli("run", str(cfg), "--out", str(tmp_path / "ref"), "--no-progress", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    expected = json.loads((tmp_path / "ref" / "results.json").read_text())["runs"][0]
    out = tmp_path / "killed"
    for delay in (2.0, 4.0):
        proc = subprocess.Popen([sys.executable, "-m", "tokenloom", "run", str(cfg), "--out", str(out), "--no-progress"],
                                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = cli("run", str(cfg), "--out", str(out), "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (got,) = json.loads((out / "results.json").read_text())["runs"]
    same_numbers(got, expected)


# ---------------------------------------------------------------------------
# tokenloom check refuses what run refuses
# ---------------------------------------------------------------------------

REFUSED = {
    "empty": ("", "the file is empty"),
    "no-generator": (TOML.format(k=3, steps=2).replace('[generator]\nname = "raster"\n', ""),
                     "a run needs a [generator]"),
    "unknown-data": (TOML.format(k=3, steps=2).replace('name = "shapes"', 'name = "shapez"'),
                     "unknown data set 'shapez'"),
    "no-holdout": (TOML.format(k=3, steps=2).replace("n_holdout = 16", "n_holdout = 0"), "data.n_holdout"),
    "banana": ('device = "banana"\n' + TOML.format(k=3, steps=2), "unknown device 'banana'"),
    "no-gpu-7": ('device = "cuda:7"\n' + TOML.format(k=3, steps=2), "cuda:7"),
    "missing-folder": (TOML.format(k=3, steps=2).replace('name = "shapes"', 'name = "folder"\npath = "/nonexistent/x"'),
                       "no such directory"),
    "grid-file-to-run": (GRID, None),
    "digits-holdout": (TOML.format(k=3, steps=2).replace('name = "shapes"', 'name = "digits"')
                       .replace("n_holdout = 16", "n_holdout = 1797"), "has 1797 images"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_check_refuses_what_run_refuses(tmp_path, case):
    from click.testing import CliRunner

    from tokenloom.cli import cli as tl

    text, words = REFUSED[case]
    path = tmp_path / f"{case}.toml"
    path.write_text(text)
    ran = CliRunner().invoke(tl, ["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    assert ran.exit_code == 2, ran.output
    assert not (tmp_path / "out" / "cache").exists() or not any((tmp_path / "out" / "cache").iterdir())
    checked = CliRunner().invoke(tl, ["check", str(path)])
    if case == "grid-file-to-run":  # run refuses a grid; check shows its plan
        assert "tokenloom ablate" in ran.output
        assert checked.exit_code == 0 and "grid ok: 1 tokenizer, 2 models, 2 generation cells" in checked.output
        return
    assert checked.exit_code == 2, checked.output
    assert words in checked.output and words in ran.output
    assert "Traceback" not in checked.output + ran.output


def test_check_counts_the_images_of_an_npz_and_a_folder_without_decoding_them(tmp_path):
    import numpy as np
    from click.testing import CliRunner
    from PIL import Image

    from tokenloom.cli import cli as tl

    npz = tmp_path / "d.npz"
    np.savez_compressed(npz, images=np.zeros((5, 8, 8, 3), np.uint8))
    folder = tmp_path / "f" / "a"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8)).save(folder / f"{i}.png")
    for name, path, total in (("npz", npz, 5), ("folder", tmp_path / "f", 3)):
        text = TOML.format(k=3, steps=2).replace('name = "shapes"', f'name = "{name}"\npath = "{path}"')
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(text.replace("n_holdout = 16", f"n_holdout = {total}"))
        res = CliRunner().invoke(tl, ["check", str(cfg)])
        assert res.exit_code == 2 and f"has {total} images" in res.output, res.output
        cfg.write_text(text.replace("n_holdout = 16", f"n_holdout = {total - 1}"))
        assert CliRunner().invoke(tl, ["check", str(cfg)]).exit_code == 0


def test_check_lists_the_skipped_cells_of_a_grid_and_refuses_a_grid_with_none(tmp_path):
    from click.testing import CliRunner

    from tokenloom.cli import cli as tl

    grid = tmp_path / "grid.toml"
    grid.write_text(GRID_BASE + '[grid]\ngenerator = [{name = "raster"}, {name = "next-scale"}]\n')
    res = CliRunner().invoke(tl, ["check", str(grid)])
    assert res.exit_code == 0, res.output
    assert "1 generation cell; 1 skipped" in res.output and "generator=next-scale" in res.output
    assert "multi-scale" in res.output
    bad = tmp_path / "bad.toml"
    bad.write_text('device = "banana"\n' + GRID)
    res = CliRunner().invoke(tl, ["check", str(bad)])
    assert res.exit_code == 2 and "no cell can run" in res.output and "unknown device 'banana'" in res.output


def test_the_readme_configuration_example_passes_check(tmp_path):
    from click.testing import CliRunner

    from tokenloom.cli import cli as tl

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Configuration"):]
    example = section[section.index("```toml") + len("```toml"):section.index("```", section.index("```toml") + 7)]
    path = tmp_path / "run.toml"
    path.write_text(example)
    res = CliRunner().invoke(tl, ["check", str(path)])
    assert res.exit_code == 0 and "ok" in res.output, res.output
    fit = CliRunner().invoke(tl, ["check", "--fit-tokenizer", str(REPO / "examples" / "tokenizer-vq.toml")])
    assert fit.exit_code == 0, fit.output


# ---------------------------------------------------------------------------
# Images read faithfully or refused
# ---------------------------------------------------------------------------


def _folder_set(tmp_path: Path, images: dict[str, object], *, channels: int = 3, size: int = 4):
    from tokenloom.config import DataConfig
    from tokenloom.data import load_dataset

    root = tmp_path / "imgs"
    for name, im in images.items():
        (root / "a").mkdir(parents=True, exist_ok=True)
        if isinstance(im, list):  # frames of an animation
            im[0].save(root / "a" / name, save_all=True, append_images=im[1:])
        else:
            im.save(root / "a" / name)
    cfg = DataConfig(name="folder", path=str(root), size=size, n=len(images), n_holdout=0, channels=channels)
    return load_dataset(cfg, split="train", seed=0)


def test_16_bit_pngs_are_scaled_not_clipped(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    grey = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369)  # 0 .. 65535
    data = _folder_set(tmp_path, {"g16.png": Image.fromarray(grey)}, channels=1)
    got = ((data.images[0, 0] + 1) * 127.5).round().to(torch.int64).numpy()
    assert (got == np.round(grey / 257.0)).all()  # 0, 17, 34, ... 255: not nearly all white
    assert got.min() == 0 and got.max() == 255 and (got < 128).sum() == 8
    err = capsys.readouterr().err
    assert "1 image 16-bit: scaled to 8 bits" in err and err.count("\n") == 1


def test_alpha_is_composited_onto_white_with_one_note(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red
    rgba[..., 3] = 0
    rgba[0, 0, 3] = 255  # one opaque pixel
    half = rgba.copy()
    half[..., 3] = 128
    opaque = rgba.copy()
    opaque[..., 3] = 255
    data = _folder_set(tmp_path, {"clear.png": Image.fromarray(rgba), "half.png": Image.fromarray(half),
                                  "opaque.png": Image.fromarray(opaque)})
    px = ((data.images + 1) * 127.5).round().to(torch.int64)
    clear, halfway, solid = px[0], px[1], px[2]  # files are read in sorted order
    assert clear[:, 0, 0].tolist() == [255, 0, 0] and clear[:, 1, 1].tolist() == [255, 255, 255]
    assert halfway[:, 1, 1].tolist() == [255, 127, 127]  # red over white at alpha 128/255
    assert (solid[0] == 255).all() and (solid[1:] == 0).all()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 images with transparency: composited onto white" in err[0]


def test_animated_images_give_their_first_frame_with_a_note(tmp_path, capsys):
    from PIL import Image

    frames = [Image.new("RGB", (4, 4), (200, 10 * i, 0)) for i in range(3)]
    data = _folder_set(tmp_path, {"anim.gif": frames, "anim.png": [f.copy() for f in frames]})
    px = ((data.images + 1) * 127.5).round().to(torch.int64)
    assert px[:, 1].max() <= 2 and px[:, 0].min() >= 190  # frame 0 (green 0), not a later frame
    err = capsys.readouterr().err
    assert "2 images animated (3 frames): first frame used" in err


def test_palette_and_tiny_images_are_read(tmp_path):
    from PIL import Image

    pal = Image.new("RGB", (4, 4), (10, 200, 30)).quantize(colors=2)
    assert pal.mode == "P"
    tiny = Image.new("RGB", (1, 1), (10, 200, 30))
    data = _folder_set(tmp_path, {"p.png": pal}, size=4)
    assert ((data.images[0] + 1) * 127.5).round()[:, 0, 0].tolist() == [10, 200, 30]
    data = _folder_set(tmp_path / "t", {"t.png": tiny}, size=4)
    assert data.images.shape == (1, 3, 4, 4)


@pytest.mark.parametrize(("labels", "names", "want"), [
    ([0, 1, 2**40], None, "would make"),
    ([0, 1, 2**62], None, "would make"),
    ([0, 1, 5], ["a", "b", "c"], "out of range for the 3 class_names"),
    ([0, -1, 1], None, "must be >= 0"),
    ([0, 1], None, "expected integers"),
])
def test_absurd_npz_labels_are_refused_quickly(tmp_path, labels, names, want):
    import numpy as np

    from tokenloom.config import DataConfig
    from tokenloom.data import load_dataset

    path = tmp_path / "d.npz"
    arrays = {"images": np.zeros((3, 4, 4, 3), np.uint8), "labels": np.array(labels, dtype=np.int64)}
    if names is not None:
        arrays["class_names"] = np.array(names)
    np.savez(path, **arrays)
    with pytest.raises(InputError, match=want):
        load_dataset(DataConfig(name="npz", path=str(path), size=4, n=3, n_holdout=0), split="train", seed=0)


# ---------------------------------------------------------------------------
# Reproducibility recorded
# ---------------------------------------------------------------------------


def test_the_run_record_carries_what_the_numbers_depend_on(tmp_path):
    out = tmp_path / "out"
    rec = run(load_config(config(tmp_path)), out, progress=False)
    env = json.loads((out / "results.json").read_text())["runs"][0]["environment"]
    assert env == rec["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    assert env["cpu_threads"] == torch.get_num_threads()
    assert env["deterministic_algorithms"] is torch.are_deterministic_algorithms_enabled()
    assert {"cudnn_deterministic", "cudnn_benchmark", "numpy", "python"} <= set(env)


def test_the_thread_count_is_part_of_the_training_cache_keys(tmp_path):
    from tokenloom.running.cache import tokenizer_key

    cfg = load_config(config(tmp_path))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = tokenizer_key(cfg, "d")
        torch.set_num_threads(2)
        two = tokenizer_key(cfg, "d")
    finally:
        torch.set_num_threads(before)
    assert one != two
    out = tmp_path / "out"
    try:
        torch.set_num_threads(1)
        a = run(cfg, out, progress=False)
        torch.set_num_threads(2)
        b = run(cfg, out, progress=False)
    finally:
        torch.set_num_threads(before)
    # another thread count trains again instead of silently reusing (and the record says which)
    assert not b["cache"]["tokenizer_reused"] and not b["cache"]["model_reused"]
    assert (a["environment"]["cpu_threads"], b["environment"]["cpu_threads"]) == (1, 2)


# ---------------------------------------------------------------------------
# Smaller items: plugin environment variables, the report
# ---------------------------------------------------------------------------


def test_plugin_environment_typos_are_warned_about(capsys, monkeypatch):
    from tokenloom.registry import Registry, env_flag

    reg = Registry.from_entry_points(disabled=["rastr"], strict=False)
    err = capsys.readouterr().err
    assert "TOKENLOOM_DISABLE_PLUGINS names 'rastr'" in err and "did you mean 'raster'?" in err
    assert "raster" in reg.available("generator")
    for value, want in (("1", True), ("yes", True), ("ON", True), ("0", False), ("off", False), ("", False)):
        monkeypatch.setenv("TOKENLOOM_STRICT_PLUGINS", value)
        assert env_flag("TOKENLOOM_STRICT_PLUGINS") is want
        assert capsys.readouterr().err == ""
    monkeypatch.setenv("TOKENLOOM_STRICT_PLUGINS", "maybe")
    assert env_flag("TOKENLOOM_STRICT_PLUGINS") is False
    assert "TOKENLOOM_STRICT_PLUGINS='maybe' is not a yes/no value" in capsys.readouterr().err


def test_a_disabled_component_is_reported_as_disabled(tmp_path):
    from tokenloom.errors import UnknownComponentError
    from tokenloom.registry import Registry

    reg = Registry.from_entry_points(disabled=["raster"], strict=False)
    with pytest.raises(UnknownComponentError, match="'raster' is disabled by TOKENLOOM_DISABLE_PLUGINS"):
        reg.get("generator", "raster")
    p = cli("check", str(config(tmp_path)), cwd=tmp_path, env={"TOKENLOOM_DISABLE_PLUGINS": "raster"})
    assert p.returncode == 2 and "is disabled by TOKENLOOM_DISABLE_PLUGINS" in p.stderr, p.stderr


def test_overview_takes_the_whole_first_row_of_a_nine_column_grid(tmp_path):
    import numpy as np
    from PIL import Image

    from tokenloom.reports import first_row_of_grid
    from tokenloom.running.images import save_grid

    images = torch.linspace(-1, 1, 18).view(18, 1, 1, 1).expand(18, 3, 8, 8).contiguous()
    png = tmp_path / "g.png"
    save_grid(png, images, ncol=9)
    row = first_row_of_grid(png)
    with Image.open(png) as im:
        full = np.asarray(im.convert("RGB"))
    cell = 64  # 8 px upscaled to at least 64
    assert row.shape == (cell + 4, full.shape[1], 3)
    assert (row[-2:] == 255).all()  # ends in the padding under the first row, not inside the second
    assert not (full[cell + 4: cell + 6] == 255).all()  # the second row starts right after it


def test_peak_memory_is_never_bolded_as_best():
    from tokenloom.reports import best_rows, direction

    rows = [{"id": "a", "metrics": {"peak_memory_bytes": {"mean": 1.0}, "nfe": {"mean": 4.0}}},
            {"id": "b", "metrics": {"peak_memory_bytes": {"mean": 2.0}, "nfe": {"mean": 8.0}}}]
    best = best_rows(rows)
    assert "peak_memory_bytes" not in best and best["nfe"] == ["a"]
    assert direction("peak_memory_bytes") == "lower"  # still shown with its arrow


# ---------------------------------------------------------------------------
# Concurrent runs into one --out, kill -9 of fit-tokenizer and ablate
# ---------------------------------------------------------------------------


def test_concurrent_result_writes_keep_every_row(tmp_path):
    import threading

    from tokenloom.running.results import write_results

    out = tmp_path / "out"
    out.mkdir()

    def record(i: int) -> dict:
        return {"id": f"r{i:03d}", "metrics": {"nfe": i}, "components": {"tokenizer": "pixel",
                "generator": "raster", "sampler": []}}

    def writer(start: int) -> None:
        for i in range(start, start + 15):
            write_results(out, record(i))

    threads = [threading.Thread(target=writer, args=(k * 100,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = {r["id"] for r in json.loads((out / "results.json").read_text())["runs"]}
    assert ids == {f"r{k * 100 + i:03d}" for k in range(3) for i in range(15)}


def _kill_and_resume(args: list[str], tmp_path: Path, delays: tuple[float, ...]) -> subprocess.CompletedProcess:
    for delay in delays:
        proc = subprocess.Popen([sys.executable, "-m", "tokenloom", *args], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return cli(*args, cwd=tmp_path)


@pytest.mark.slow
def test_kill_9_during_fit_tokenizer_then_resume_gives_the_same_report(tmp_path):
    cfg = tmp_path / "vq.toml"
    cfg.write_text('seed = 0\n[data]\nname = "shapes"\nsize = 16\nn = 400\nn_holdout = 64\n'
                   '[tokenizer]\nname = "vq"\ncodebook_size = 32\ncode_dim = 8\ndownsample = 4\nsteps = 300\n')
    ref = cli("fit-tokenizer", str(cfg), "--out", str(tmp_path / "ref"), "--no-progress", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    done = _kill_and_resume(["fit-tokenizer", str(cfg), "--out", str(tmp_path / "killed"), "--no-progress"],
                            tmp_path, (3.0, 5.0))
    assert done.returncode == 0, done.stderr
    a = json.loads((tmp_path / "ref" / "reconstruction.json").read_text())["holdout"]
    b = json.loads((tmp_path / "killed" / "reconstruction.json").read_text())["holdout"]
    untimed = [k for k in a if not k.endswith("seconds")]
    assert "mse" in untimed and {k: a[k] for k in untimed} == {k: b[k] for k in untimed}


@pytest.mark.slow
def test_kill_9_during_an_ablation_then_resume_loses_no_cell(tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID.replace("steps = 3", "steps = 40"))
    ref = cli("ablate", str(grid), "--out", str(tmp_path / "ref"), "--no-progress", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    done = _kill_and_resume(["ablate", str(grid), "--out", str(tmp_path / "killed"), "--no-progress"],
                            tmp_path, (3.0, 4.0, 5.0))
    assert done.returncode == 0, done.stderr
    a = json.loads((tmp_path / "ref" / "results.json").read_text())["runs"]
    b = json.loads((tmp_path / "killed" / "results.json").read_text())["runs"]
    assert [r["id"] for r in a] == [r["id"] for r in b]
    for x, y in zip(a, b):
        for key in DETERMINISTIC:
            assert x["metrics"][key] == y["metrics"][key]
        assert x["train"]["final_loss"] == y["train"]["final_loss"]


@pytest.mark.slow
def test_kill_9_during_the_tokenizer_fit_of_a_run_resumes_the_fit(tmp_path):
    cfg = tmp_path / "vq-run.toml"
    cfg.write_text(TOML.format(k=3, steps=4).replace(
        '[tokenizer]\nname = "pixel"\nbits = 1\npool = 2\n',
        '[tokenizer]\nname = "vq"\ncodebook_size = 16\ncode_dim = 4\ndownsample = 2\nsteps = 600\n'))
    ref = cli("run", str(cfg), "--out", str(tmp_path / "ref"), "--no-progress", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "tokenloom", "run", str(cfg), "--out", str(out), "--no-progress"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    state = []
    for _ in range(3000):  # kill -9 as soon as the fit has written its first training state
        state = list((out / "cache").glob("tokenizer-*.train.safetensors"))
        if state or proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not state:
        pytest.skip("the fit finished before a kill could land inside it")
    assert not list((out / "cache").glob("tokenizer-*[0-9a-f].safetensors"))  # killed inside the fit
    done = cli("run", str(cfg), "--out", str(out), "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (a,) = json.loads((tmp_path / "ref" / "results.json").read_text())["runs"]
    (b,) = json.loads((out / "results.json").read_text())["runs"]
    same_numbers(a, b)
    assert not list((out / "cache").glob("tokenizer-*.train.safetensors"))  # the fit finished and cleaned up


def test_a_corrupt_tokenizer_training_state_is_moved_aside_and_the_fit_restarts(tmp_path, capsys):
    from tokenloom.config import parse_config
    from tokenloom.running.tokenizer_fit import fit_tokenizer_run

    cfg = parse_config({"seed": 0, "data": {"name": "shapes", "size": 8, "n": 64, "n_holdout": 16},
                        "tokenizer": {"name": "vq", "codebook_size": 8, "code_dim": 4, "downsample": 2,
                                      "steps": 12}})
    ref = fit_tokenizer_run(cfg, tmp_path / "ref", progress=False)
    out = tmp_path / "bad"
    out.mkdir()
    (out / "train_state.safetensors").write_bytes(b"\x00" * 64)
    capsys.readouterr()
    got = fit_tokenizer_run(cfg, out, progress=False)
    err = capsys.readouterr().err
    assert "train_state.safetensors" in err and "moved aside" in err
    assert (out / "train_state.safetensors.corrupt").is_file()
    assert got["holdout"]["mse"] == ref["holdout"]["mse"]


def test_a_metadata_file_that_is_not_utf8_is_named(tmp_path):
    from PIL import Image

    from tokenloom.config import DataConfig
    from tokenloom.data import load_dataset

    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "a" / "x.png")
    (root / "metadata.jsonl").write_bytes('{"file_name": "a/x.png", "text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(InputError, match=r"metadata.jsonl: not UTF-8 text"):
        load_dataset(DataConfig(name="folder", path=str(root), size=4, n=1, n_holdout=0), split="train", seed=0)


def test_npz_files_holding_pickles_or_not_zip_are_refused_without_advice_to_unpickle(tmp_path):
    import numpy as np

    from tokenloom.config import DataConfig
    from tokenloom.data import load_dataset

    objs = tmp_path / "objs.npz"
    np.savez(objs, images=np.zeros((3, 4, 4, 3), np.uint8), labels=np.array([{"a": 1}, 2, 3], dtype=object))
    text = tmp_path / "text.npz"
    text.write_text("root:x:0:0\n")
    for path, want in ((objs, "pickled Python objects, which tokenloom never loads"), (text, "not an .npz file")):
        with pytest.raises(InputError, match=want) as exc:
            load_dataset(DataConfig(name="npz", path=str(path), size=4, n=2, n_holdout=1), split="train", seed=0)
        assert "allow_pickle" not in str(exc.value)


def test_an_os_error_from_an_atomic_write_names_the_target_file(tmp_path):
    from click.testing import CliRunner

    from tokenloom.cli import cli as tl

    out = tmp_path / "out"
    (out / "results.json").mkdir(parents=True)  # the atomic replace of results.json fails
    res = CliRunner().invoke(tl, ["run", str(config(tmp_path)), "--out", str(out), "--no-progress"])
    assert res.exit_code == 3
    (line,) = res.output.strip().splitlines()
    assert line.endswith(f"{out / 'results.json'} — give a file") and ".tmp" not in line, line
    assert (out / "records").is_dir() and len(list((out / "records").glob("*.json"))) == 1  # the run is kept


def test_a_corrupt_ablation_results_json_is_moved_aside_and_rebuilt_from_the_cells(tmp_path, capsys):
    out = tmp_path / "abl"
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID)
    first = run_ablation(grid, out, progress=False, echo=lambda _m: None, plots=False)
    plan = plan_grid(__import__("tomllib").loads(GRID))
    cell_path(out, plan.cells[1]).unlink()  # one cell to run again, so the report is rewritten per cell
    (out / "results.json").write_text('{"runs": [')
    capsys.readouterr()
    again = run_ablation(grid, out, progress=False, echo=lambda _m: None, plots=False)
    err = capsys.readouterr().err
    assert "results.json" in err and "moved aside" in err and (out / "results.json.corrupt").is_file()
    assert [r["id"] for r in again["runs"]] == [r["id"] for r in first["runs"]]


def test_sample_finds_a_run_trained_under_another_thread_count(tmp_path):
    from tokenloom.running.sample import sample_run

    before = torch.get_num_threads()
    out = tmp_path / "out"
    try:
        torch.set_num_threads(1)
        run(load_config(config(tmp_path)), out, progress=False)
        torch.set_num_threads(2)
        got = sample_run(out, n=4, progress=False)
        assert torch.get_num_threads() == 1  # the run's thread count: its cache keys and numerics
    finally:
        torch.set_num_threads(before)
    assert Path(got["path"]).is_file()
