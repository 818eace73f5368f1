"""The built-in data sets: determinism by (seed, index), ranges, the shapes
rules and attributes, and clear errors for users' folders and npz files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tokenloom import ConfigError, InputError
from tokenloom.config import DataConfig
from tokenloom.data import (
    SHAPE_CLASSES,
    SHAPES_BACKGROUND,
    SHAPES_COLOURS,
    SHAPES_RULES,
    load_dataset,
    parse_shapes,
    render_shapes,
    shape_regions,
    shapes_attributes,
)


def shapes(size=16, n=12, n_holdout=4, seed=0, split="train"):
    return load_dataset(DataConfig(name="shapes", size=size, n=n, n_holdout=n_holdout), split=split, seed=seed)


# ---------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------


def test_shapes_types_shapes_and_range():
    s = shapes(size=16, n=12)
    assert s.images.dtype == torch.float32 and tuple(s.images.shape) == (12, 3, 16, 16)
    assert s.labels.dtype == torch.long and tuple(s.labels.shape) == (12,)
    assert s.images.min() >= -1 and s.images.max() <= 1
    assert s.n_classes == 3 and s.class_names == SHAPE_CLASSES
    assert len(s.attributes) == 12 and len(s) == 12


def test_shapes_image_i_depends_only_on_seed_and_i():
    a = shapes(n=10, n_holdout=0)
    b = shapes(n=25, n_holdout=3)
    assert torch.equal(a.images, b.images[:10]) and torch.equal(a.labels, b.labels[:10])
    # the held-out split continues the index range: indices n .. n + n_holdout - 1
    ho = shapes(n=10, n_holdout=5, split="holdout")
    assert torch.equal(ho.images, b.images[10:15])
    assert [x["index"] for x in ho.attributes] == list(range(10, 15))
    assert not torch.equal(shapes(seed=1).images, shapes(seed=0).images)


def test_shapes_same_scene_at_every_size():
    small, big = shapes(size=16, n=6), shapes(size=64, n=6)
    for a, b in zip(small.attributes, big.attributes):
        assert (a["class"], a["colours"], a["positions"], a["sizes"]) == (b["class"], b["colours"], b["positions"], b["sizes"])


def test_shapes_follow_their_rules():
    s = shapes(size=32, n=200)
    palette = {tuple(c) for c in SHAPES_COLOURS.values()} | {tuple(SHAPES_BACKGROUND)}
    pixels = ((s.images + 1) / 2).permute(0, 2, 3, 1).reshape(-1, 3)
    assert {tuple(p) for p in pixels.unique(dim=0).tolist()} <= palette  # every pixel a palette colour
    counts = set()
    for img, label, a in zip(s.images, s.labels, s.attributes):
        assert a["label"] == int(label) and a["class"] == SHAPE_CLASSES[int(label)]
        lo, hi = SHAPES_RULES["count"]
        assert lo <= a["count"] <= hi and len(a["shapes"]) == a["count"] == len(a["colours"])
        counts.add(a["count"])
        smin, smax = SHAPES_RULES["size_range"][a["count"]]
        for p in a["shapes"]:
            assert p["shape"] == a["class"] and p["colour"] in SHAPES_COLOURS
            assert smin <= p["size"] <= smax
            cx, cy = p["position"]
            assert p["size"] <= cx <= 1 - p["size"] and p["size"] <= cy <= 1 - p["size"]  # wholly inside
        for i, p in enumerate(a["shapes"]):  # bounding boxes at least min_gap apart
            for q in a["shapes"][i + 1 :]:
                gap = SHAPES_RULES["min_gap"] - 1e-9
                assert (abs(p["position"][0] - q["position"][0]) >= p["size"] + q["size"] + gap
                        or abs(p["position"][1] - q["position"][1]) >= p["size"] + q["size"] + gap)
        assert torch.equal(render_shapes(a, 32), img)
    assert counts == {1, 2, 3}
    assert set(s.labels.tolist()) == {0, 1, 2}


def test_shapes_attributes_are_a_pure_function():
    a = shapes_attributes(7, [5, 3, 9])
    b = shapes_attributes(7, [9, 5])
    assert a[0] == b[1] and a[2] == b[0]


def test_parse_shapes_reads_the_rules_back():
    s = shapes(size=64, n=40)
    ok = 0
    for img, a in zip(s.images, s.attributes):
        found = parse_shapes(img)
        ok += (len(found) == a["count"] and all(f["shape"] == a["class"] for f in found)
               and sorted(f["colour"] for f in found) == sorted(a["colours"]))
    assert ok >= 38
    with pytest.raises(InputError, match="RGB"):
        parse_shapes(torch.zeros(1, 8, 8))


def test_shape_regions_is_the_one_parser_of_the_data_set_and_the_oracle():
    import tokenloom.plugins.metrics.shapes_oracle as oracle

    s = shapes(size=32, n=12)
    judge = oracle.ShapesOracle(oracle.ShapesOracle.Config())
    for img, a in zip(s.images, s.attributes):
        regions, distance = shape_regions(img)
        assert distance.shape == (32, 32) and float(distance.max()) < 1e-6  # rendered pixels are exact colours
        # the ground-truth pixel boxes and colours are what the parser reads back
        want = sorted((p["bbox"], p["colour"]) for p in a["shapes"] if p["bbox"] is not None)
        got = sorted((r["bbox"], r["colour"]) for r in regions)
        assert got == want
        for r in regions:
            x0, y0, x1, y1 = r["bbox"]
            assert r["mask"].shape == (y1 - y0, x1 - x0) and int(r["mask"].sum()) == r["pixels"]
            assert int(r["colour_pixels"].sum()) == r["pixels"]
        # parse_shapes and the oracle see the same regions
        assert sorted(f["bbox"] for f in parse_shapes(img)) == sorted(r["bbox"] for r in regions)
        verdict = judge.judge(img, a["label"])
        assert verdict["count"] == len(regions) and verdict["colours"] == sorted(r["colour"] for r in regions)
    # a pixel half-way between palette colours is unclean, and far from both
    img = torch.full((3, 8, 8), -1.0)
    img[0, 2:5, 2:5] = 0.0  # red at half intensity: distance 0.5 from black and from red
    regions, distance = shape_regions(img)
    assert abs(float(distance.max()) - 0.5) < 1e-6
    with pytest.raises(InputError, match="where-it-was"):
        shape_regions(torch.zeros(3, 8), where="where-it-was")


def test_shapes_config_errors():
    with pytest.raises(ConfigError, match="channels"):
        load_dataset(DataConfig(name="shapes", channels=1, n=2))
    with pytest.raises(ConfigError, match="at least 8"):
        load_dataset(DataConfig(name="shapes", size=4, n=2))
    with pytest.raises(ConfigError, match="did you mean 'shapes'"):
        load_dataset(DataConfig(name="shape", n=2))
    with pytest.raises(ConfigError, match="split"):
        load_dataset(DataConfig(n=2), split="test")


# ---------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------


def test_digits_upscaled_labelled_and_split():
    cfg = DataConfig(name="digits", size=16, n=100, n_holdout=50, channels=3)
    tr, ho = load_dataset(cfg), load_dataset(cfg, split="holdout")
    assert tuple(tr.images.shape) == (100, 3, 16, 16) and tuple(ho.images.shape) == (50, 3, 16, 16)
    assert tr.images.dtype == torch.float32 and tr.images.min() >= -1 and tr.images.max() <= 1
    assert torch.equal(tr.images[:, 0], tr.images[:, 2])  # grey replicated
    assert tr.n_classes == 10 and set(tr.labels.tolist()) <= set(range(10)) and len(set(tr.labels.tolist())) > 5
    flat_tr = {tuple(x.flatten().tolist()) for x in tr.images}
    assert not any(tuple(x.flatten().tolist()) in flat_tr for x in ho.images)  # disjoint
    again = load_dataset(cfg)
    assert torch.equal(again.images, tr.images)
    # background of a digit is dark (-1), strokes bright
    assert tr.images.mean() < 0 and tr.images.max() > 0.9


def test_digits_fewer_than_asked_warns():
    with pytest.warns(UserWarning, match="fewer than data.n"):
        s = load_dataset(DataConfig(name="digits", size=8, n=5000, n_holdout=97, channels=1))
    assert len(s) == 1797 - 97


# ---------------------------------------------------------------------------
# folder
# ---------------------------------------------------------------------------


def _png(path, size=(12, 12), colour=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_folder_reads_classes_from_subfolders(tmp_path):
    for i in range(3):
        _png(tmp_path / "cats" / f"{i}.png", colour=(255, 255, 255))
        _png(tmp_path / "dogs" / f"{i}.jpg", colour=(0, 0, 0))
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    cfg = DataConfig(name="folder", path=str(tmp_path), size=8, n=4, n_holdout=2)
    tr, ho = load_dataset(cfg), load_dataset(cfg, split="holdout")
    assert tr.class_names == ("cats", "dogs") and tr.n_classes == 2
    assert len(tr) == 4 and len(ho) == 2 and tuple(tr.images.shape[1:]) == (3, 8, 8)
    for img, label in zip(tr.images, tr.labels):  # cats are white, dogs black (JPEG: nearly)
        assert (img.mean() > 0.9) if label == 0 else (img.mean() < -0.9)


@pytest.mark.parametrize("case", ["missing", "no-classes", "empty-class", "unreadable", "mixed-sizes"])
def test_folder_errors_name_the_problem(tmp_path, case):
    root = tmp_path / "data"
    _png(root / "a" / "1.png")
    want = None
    if case == "missing":
        root = tmp_path / "nope"
        want = "no such directory"
    elif case == "no-classes":
        root = tmp_path / "flat"
        _png(root / "i.png")
        want = "no class sub-folders"
    elif case == "empty-class":
        (root / "b").mkdir()
        want = "holds no images"
    elif case == "unreadable":
        (root / "a" / "broken.png").write_bytes(b"not a png at all")
        want = "broken.png"
    elif case == "mixed-sizes":
        _png(root / "a" / "2.png", size=(16, 16))
        want = "mixed image sizes"
    with pytest.raises(InputError, match=want):
        load_dataset(DataConfig(name="folder", path=str(root), size=8, n=4, n_holdout=0))


def test_folder_needs_a_path():
    with pytest.raises(ConfigError, match="data.path"):
        load_dataset(DataConfig(name="folder"))


# ---------------------------------------------------------------------------
# npz
# ---------------------------------------------------------------------------


def test_npz_uint8_and_float(tmp_path):
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "u8.npz", images=u8, labels=np.arange(10) % 2, class_names=np.array(["even", "odd"]))
    s = load_dataset(DataConfig(name="npz", path=str(tmp_path / "u8.npz"), size=8, n=10, n_holdout=0))
    assert s.images.dtype == torch.float32 and s.n_classes == 2 and s.class_names == ("even", "odd")
    order = torch.tensor(sorted(range(10)))
    assert torch.allclose(s.images, torch.from_numpy(u8).permute(0, 3, 1, 2)[order].float() / 127.5 - 1)
    f = rng.uniform(-1, 1, (6, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "f.npz", images=f)
    g = load_dataset(DataConfig(name="npz", path=str(tmp_path / "f.npz"), size=16, n=5, n_holdout=1, channels=3))
    assert tuple(g.images.shape) == (5, 3, 16, 16) and g.n_classes == 1
    assert g.images.min() >= -1 and g.images.max() <= 1


@pytest.mark.parametrize("arrays, want", [
    ({"images": np.zeros((4, 8, 8, 3), dtype=np.int64)}, r"\['images'\]: dtype int64"),
    ({"images": np.full((4, 3, 8, 8), 2.0, dtype=np.float32)}, r"\['images'\]: float images must lie in \[-1, 1\]"),
    ({"images": np.full((4, 3, 8, 8), np.nan, dtype=np.float32)}, "NaN"),
    ({"images": np.zeros((4, 8, 8), dtype=np.float32)}, r"\[N, C, H, W\]"),
    ({"pictures": np.zeros((4, 8, 8, 3), dtype=np.uint8)}, "no array 'images'"),
    ({"images": np.zeros((4, 8, 8, 3), dtype=np.uint8), "labels": np.zeros(3, dtype=np.int64)}, r"\['labels'\]"),
    ({"images": np.zeros((4, 8, 8, 3), dtype=np.uint8), "labels": np.zeros(4)}, r"\['labels'\]"),
    ({"images": np.zeros((4, 8, 6, 3), dtype=np.uint8)}, "only square"),
])
def test_npz_errors_name_the_array(tmp_path, arrays, want):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InputError, match=want):
        load_dataset(DataConfig(name="npz", path=str(tmp_path / "bad.npz"), size=8, n=4, n_holdout=0))


def test_npz_missing_or_corrupt_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_dataset(DataConfig(name="npz", path=str(tmp_path / "none.npz")))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(InputError, match="cannot read"):
        load_dataset(DataConfig(name="npz", path=str(tmp_path / "junk.npz")))


def test_holdout_larger_than_the_set_is_a_config_error(tmp_path):
    np.savez(tmp_path / "s.npz", images=np.zeros((3, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(ConfigError, match="n_holdout"):
        load_dataset(DataConfig(name="npz", path=str(tmp_path / "s.npz"), size=8, n=3, n_holdout=3))
