"""Streamed data sets (folder, Hugging Face datasets directory) and the sharded code store.

The streamed path gives the in-memory path's images; bad input is one readable error (or, where
configured, a counted skip/upscale); a tokenizer fits on streamed images without holding them;
the code store is written once, reused, resumes a killed shard, refuses another tokenizer's store
and splits its shards between processes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import tokenloom
from tokenloom.blocks.streaming import LazyImages, center_crop_arr, is_lazy
from tokenloom.config import DataConfig
from tokenloom.data import load_dataset, open_dataset
from tokenloom.errors import CheckpointError, ConfigError, InputError
from tokenloom.running.codestore import CodeArray, CodeStore, code_dtype, encode_shards
from tokenloom.running.pipeline import encode_all


def _folder(root, n_per_class=6, size=16, classes=("cat", "dog"), seed=0, captions=False):
    rng = np.random.default_rng(seed)
    rows = []
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            name = f"{c}/{i:03d}.png"
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name)
            rows.append({"file_name": name, "text": f"a {c} number {i}"})
    if captions:
        (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def _cfg(root, **kw):
    base = {"name": "folder", "path": str(root), "size": 8, "n": 8, "n_holdout": 4, "workers": 0}
    base.update(kw)
    return DataConfig(**base)


# ---------------------------------------------------------------------------
# folder
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_folder_gives_the_in_memory_images_labels_and_captions(tmp_path, workers):
    root = _folder(tmp_path / "f", captions=True)
    cfg = _cfg(root, workers=workers)
    for split in ("train", "holdout"):
        mem = load_dataset(cfg, split=split, seed=3)
        st = open_dataset(cfg, split=split, seed=3)
        assert is_lazy(st.images) and tuple(st.images.shape) == tuple(mem.images.shape)
        assert torch.equal(st.images.materialize(), mem.images)  # 16 px resized to 8: the same pixels
        assert torch.equal(st.images[torch.tensor([2, 0])], mem.images[torch.tensor([2, 0])])
        assert torch.equal(st.labels, mem.labels) and st.captions == mem.captions
        assert st.class_names == mem.class_names == ("cat", "dog")


def test_streamed_sets_handed_to_a_run_are_keyed_by_their_files(tmp_path):
    from tokenloom.running.cache import data_content_key

    root = _folder(tmp_path / "f")
    key = data_content_key(open_dataset(_cfg(root), split="train"), open_dataset(_cfg(root), split="holdout"))
    assert key == data_content_key(open_dataset(_cfg(root), split="train"),
                                   open_dataset(_cfg(root), split="holdout"))
    Image.new("RGB", (16, 16), (1, 2, 3)).save(root / "cat" / "000.png")  # one image replaced in place
    os.utime(root / "cat" / "000.png", ns=(1, 1))  # its modification time changes, whatever the clock
    assert key != data_content_key(open_dataset(_cfg(root), split="train"),
                                   open_dataset(_cfg(root), split="holdout"))


def test_builtin_sets_stay_in_memory_behind_the_same_interface():
    cfg = DataConfig(name="shapes", size=8, n=8, n_holdout=2)
    got = open_dataset(cfg, split="train", seed=0)
    assert not is_lazy(got.images) and torch.equal(got.images, load_dataset(cfg, split="train").images)
    with pytest.raises(ConfigError, match="data.flip"):
        open_dataset(DataConfig(name="shapes", size=8, n=8, n_holdout=2, flip=True))


def test_non_square_images_are_centre_cropped_bilinear_or_adm(tmp_path):
    root = tmp_path / "f"
    (root / "a").mkdir(parents=True)
    arr = np.random.default_rng(1).integers(0, 256, (20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high
    Image.fromarray(arr).save(root / "a" / "wide.png")
    bil = open_dataset(_cfg(root, n=1, n_holdout=0, size=10), split="train").images[0]
    crop = torch.from_numpy(arr[:, 10:30].copy()).permute(2, 0, 1).float() / 127.5 - 1
    want = torch.nn.functional.interpolate(crop[None], size=(10, 10), mode="bilinear", align_corners=False,
                                           antialias=True).clamp(-1, 1)[0]
    assert torch.equal(bil, want)
    adm = open_dataset(_cfg(root, n=1, n_holdout=0, size=10, resize="adm"), split="train").images[0]
    ref = np.asarray(center_crop_arr(Image.fromarray(arr), 10))
    assert ref.shape == (10, 10, 3)
    assert torch.equal(adm, torch.from_numpy(ref.copy()).permute(2, 0, 1).float() / 127.5 - 1)


def test_unreadable_images_are_an_error_naming_them_or_skipped_with_a_count(tmp_path, capsys):
    root = _folder(tmp_path / "f")
    (root / "cat" / "broken.png").write_bytes(b"not a png")
    good = (root / "dog" / "000.png").read_bytes()
    (root / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(InputError, match=r"broken\.png.*unreadable = \"skip\""):
        open_dataset(_cfg(root))
    st = open_dataset(_cfg(root, unreadable="skip", n=100, n_holdout=0), split="train")
    assert len(st) == 12  # both bad files left out
    err = capsys.readouterr().err
    assert "skipped 2 unreadable images" in err and "cat/broken.png" in err and "dog/truncated.png" in err


@pytest.mark.parametrize("workers", [0, 1])
def test_an_image_broken_after_the_scan_is_one_error_naming_it(tmp_path, workers):
    root = _folder(tmp_path / "f")
    images = open_dataset(_cfg(root, workers=workers, n=100, n_holdout=0), split="train").images
    (root / "dog" / "002.png").write_bytes(b"gone bad")
    with pytest.raises(InputError) as info:
        list(images.batches([[0, 1], list(range(12))]))
    msg = str(info.value)
    assert msg.startswith("folder data set: cannot read image") and "dog/002.png" in msg
    assert "Traceback" not in msg and "\n" not in msg


def test_small_images_are_upscaled_with_a_count_or_refused(tmp_path):
    root = _folder(tmp_path / "f", size=16)
    Image.new("RGB", (4, 4), (255, 0, 0)).save(root / "cat" / "tiny.png")
    with pytest.warns(UserWarning, match=r"1 image smaller than data.size = 8 px \(cat/tiny.png\): upscaled"):
        st = open_dataset(_cfg(root, n=100, n_holdout=0), split="train")
    tiny = st.images[[i for i in range(len(st)) if os.fsdecode(st.images.source.files[i]).endswith("tiny.png")]]
    assert tiny.shape == (1, 3, 8, 8) and torch.allclose(tiny[0, 0], torch.ones(8, 8))
    with pytest.raises(InputError, match=r"smaller than data.size = 8 px.*tiny.png.*small = \"upscale\""):
        open_dataset(_cfg(root, small="error"))


def test_flip_draws_mirrored_images(tmp_path):
    root = _folder(tmp_path / "f")
    st = open_dataset(_cfg(root, flip=True), split="train")
    (x,) = list(st.images.batches([[~0, 0]]))
    assert torch.equal(x[0], x[1].flip(-1)) and not torch.equal(x[0], x[1])
    assert st.images.identity()["flip"] and not open_dataset(_cfg(root, flip=True), split="holdout").images.flip


# ---------------------------------------------------------------------------
# hf (a datasets directory on local disk)
# ---------------------------------------------------------------------------


def _hf_dir(tmp_path, root, *, image=True, fmt="disk"):
    datasets = pytest.importorskip("datasets")
    files = sorted(p for p in root.rglob("*.png"))
    classes = sorted({p.parent.name for p in files})
    rows = {"label": [classes.index(p.parent.name) for p in files], "text": [p.stem for p in files]}
    features = {"label": datasets.ClassLabel(names=classes), "text": datasets.Value("string")}
    if image:
        rows["image"] = [str(p) for p in files]
        features["image"] = datasets.Image()
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features(features))
    out = tmp_path / f"hf-{fmt}"
    if fmt == "disk":
        ds.save_to_disk(str(out))
    else:
        out.mkdir()
        ds.to_parquet(str(out / "train.parquet"))
    return out


@pytest.mark.parametrize("fmt", ["disk", "parquet"])
def test_hf_directory_streams_the_same_images_as_the_folder(tmp_path, fmt):
    root = _folder(tmp_path / "f")
    path = _hf_dir(tmp_path, root, fmt=fmt)
    folder = load_dataset(_cfg(root), split="train", seed=1)
    cfg = DataConfig(name="hf", path=str(path), size=8, n=8, n_holdout=4, workers=0)
    st = open_dataset(cfg, split="train", seed=1)
    assert torch.equal(st.images.materialize(), folder.images)
    assert torch.equal(st.labels, folder.labels) and st.class_names == ("cat", "dog")
    assert st.captions is not None and len(st.captions) == 8
    assert torch.equal(load_dataset(cfg, split="holdout", seed=1).images,
                       load_dataset(_cfg(root), split="holdout", seed=1).images)


def test_hf_directory_without_an_image_column_is_one_clear_error(tmp_path):
    path = _hf_dir(tmp_path, _folder(tmp_path / "f"), image=False)
    with pytest.raises(InputError, match=rf"{path}.*no image column \(columns: label, text"):
        open_dataset(DataConfig(name="hf", path=str(path), size=8, n=8, n_holdout=4))
    with pytest.raises(InputError, match="data.image_column = 'pixels' is not a column"):
        open_dataset(DataConfig(name="hf", path=str(path), size=8, n=8, n_holdout=4, image_column="pixels"))


def test_hf_without_the_datasets_package_names_the_extra(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets":
            raise ImportError("no datasets")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ConfigError, match=r"tokenloom\[datasets\]"):
        open_dataset(DataConfig(name="hf", path=str(tmp_path), size=8, n=8, n_holdout=4))


# ---------------------------------------------------------------------------
# fitting on streamed images
# ---------------------------------------------------------------------------


def _vq(steps=6):
    return tokenloom.create("tokenizer", "vq", image_shape=(3, 8, 8), downsample=2, codebook_size=16, steps=steps,
                            batch_size=4)


def test_fit_takes_streamed_images_with_any_worker_count_and_resumes(tmp_path):
    root = _folder(tmp_path / "f")
    images = open_dataset(_cfg(root, workers=0), split="train").images
    torch.manual_seed(0)
    a = _vq()
    a.fit(images, progress=False)
    torch.manual_seed(0)
    b = _vq()
    b.fit(LazyImages(images.source, workers=2), progress=False)  # decoded by two worker processes
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    torch.manual_seed(0)
    c = _vq()
    state = tmp_path / "state.safetensors"
    from tokenloom.blocks.tokenizer_train import train_tokenizer

    train_tokenizer(c, images, steps=6, batch_size=4, lr=c.config.lr, seed=c.config.seed, progress=False,
                    checkpoint=state, checkpoint_every=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
    # the in-memory tensor path is untouched (third-party tokenizers call fit(tensor))
    torch.manual_seed(0)
    d = _vq()
    d.fit(images.materialize(), progress=False)
    assert d.encode(images[:4]).shape == (4, 16)


# ---------------------------------------------------------------------------
# the code store
# ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _small_shards(monkeypatch):
    """Shards of 16 rows, so that a few dozen images fill several."""
    import tokenloom.running.codestore as cs

    monkeypatch.setattr(cs, "SHARD_ROWS", 16)


class Counting:
    """A tokenizer wrapper that counts the images it encodes."""

    def __init__(self, tok):
        self.tok, self.encoded = tok, 0

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def encode(self, x):
        self.encoded += x.shape[0]
        return self.tok.encode(x)


def _sets(n=40, n_holdout=8):
    cfg = DataConfig(name="shapes", size=8, n=n, n_holdout=n_holdout)
    return {"train": load_dataset(cfg, split="train"), "holdout": load_dataset(cfg, split="holdout")}


def test_code_store_is_written_once_and_reused_and_indexes_like_a_tensor(tmp_path):
    sets = _sets()
    tok = Counting(tokenloom.create("tokenizer", "pixel", image_shape=(3, 8, 8), bits=2, pool=2))
    codes = encode_all(tok, "tokA", sets, tmp_path, key_extra={"d": 1}, device=torch.device("cpu"))
    assert tok.encoded == 48
    want = tok.tok.encode(sets["train"].images)
    train = codes["train"]
    assert isinstance(train, CodeArray) and train.shape == want.shape and train.np_dtype == "uint16"
    idx = torch.tensor([39, 0, 17, 17, 5])
    assert torch.equal(train[idx], want[idx]) and train[idx].dtype == torch.long
    assert torch.equal(train[3:20], want[3:20]) and torch.equal(train.tensor(), want)
    assert torch.equal(codes["holdout"], tok.tok.encode(sets["holdout"].images))
    (store,) = tmp_path.glob("codes-*")
    assert sorted(p.name for p in store.glob("train-*.npy")) == ["train-00000.npy", "train-00001.npy",
                                                                  "train-00002.npy"]
    again = encode_all(tok, "tokA", sets, tmp_path, key_extra={"d": 1}, device=torch.device("cpu"))
    assert tok.encoded == 48 and torch.equal(again["train"].tensor(), want)  # nothing encoded the second time


def test_a_half_written_or_damaged_shard_is_redone_alone(tmp_path):
    sets = _sets()
    tok = Counting(tokenloom.create("tokenizer", "pixel", image_shape=(3, 8, 8), bits=2, pool=2))
    encode_all(tok, "tokA", sets, tmp_path, key_extra={"d": 1}, device=torch.device("cpu"))
    (store,) = tmp_path.glob("codes-*")
    meta = json.loads((store / "store.json").read_text())
    # what a job killed mid-encoding leaves: the store unfinished, a temporary half-shard, one shard
    # missing and one truncated (e.g. a copy that ran out of disk)
    (store / "store.json").write_text(json.dumps({**meta, "complete": False}))
    full = (store / "train-00001.npy").read_bytes()
    (store / "train-00001.npy").unlink()
    (store / "train-00001.npy.tmp999").write_bytes(full[:100])
    damaged = (store / "train-00002.npy").read_bytes()
    (store / "train-00002.npy").write_bytes(damaged[: len(damaged) - 10])
    tok.encoded = 0
    codes = encode_all(tok, "tokA", sets, tmp_path, key_extra={"d": 1}, device=torch.device("cpu"))
    assert tok.encoded == 16 + 8  # shards 1 (16 rows) and 2 (8 rows) only
    assert not list(store.glob("*.tmp*"))
    assert torch.equal(codes["train"].tensor(), tok.tok.encode(sets["train"].images))


def test_a_store_of_another_tokenizer_is_refused_or_redone(tmp_path, capsys):
    store = CodeStore(tmp_path / "s", "key-A")
    layout = {"train": {"n": 4, "row_shape": [3], "dtype": "uint16"}}
    store.prepare(layout)
    store.write_shard("train", 0, np.arange(12).reshape(4, 3))
    store.finish()
    other = CodeStore(tmp_path / "s", "key-B")
    assert not other.complete()
    with pytest.raises(CheckpointError, match="another tokenizer or other images"):
        other.prepare(layout)
    other.prepare(layout, overwrite=True)
    assert "encoding again" in capsys.readouterr().err
    assert other.missing() == [("train", 0)] and other.meta()["key"] == "key-B"


def test_processes_encode_disjoint_shards_that_together_fill_the_store(tmp_path):
    store = CodeStore(tmp_path / "s", "k")
    store.prepare({"train": {"n": 5 * 16, "row_shape": [2], "dtype": "int32"}})
    todo = store.missing()
    done = [encode_shards(store, todo, lambda split, a, b: np.stack([np.arange(a, b)] * 2, 1), rank=r, world=2)
            for r in (0, 1)]
    assert set(done[0]).isdisjoint(done[1]) and sorted(done[0] + done[1]) == todo
    assert store.missing() == []
    arr = store.read("train")
    assert torch.equal(arr[torch.tensor([0, 5 * 16 - 1])][:, 0], torch.tensor([0, 5 * 16 - 1]))


def test_store_dtypes_fit_the_vocabulary_and_hold_continuous_latents(tmp_path):
    assert code_dtype(65536) == "uint16" and code_dtype(65537) == "int32"
    assert code_dtype(None, continuous=True) == "float32"
    assert code_dtype(None, continuous=True, latent_dtype="float16") == "float16"
    store = CodeStore(tmp_path / "s", "k")
    store.prepare({"train": {"n": 20, "row_shape": [4, 3], "dtype": "float32"}})
    lat = np.random.default_rng(0).standard_normal((20, 4, 3)).astype(np.float32)
    encode_shards(store, store.missing(), lambda split, a, b: lat[a:b])
    arr = store.read("train")
    assert arr.shape == (20, 4, 3) and arr.dtype == torch.float32
    assert torch.equal(arr[torch.tensor([19, 2])], torch.from_numpy(lat[[19, 2]]))


@pytest.mark.slow
def test_a_run_on_a_streamed_folder_trains_from_the_code_store(tmp_path):
    from tokenloom.config import load_config
    from tokenloom.pipeline import run

    root = _folder(tmp_path / "f", n_per_class=12)
    toml = tmp_path / "run.toml"
    toml.write_text(f"""
seed = 0
[data]
name = "folder"
path = "{root}"
size = 8
n = 16
n_holdout = 8
workers = 1
[tokenizer]
name = "vq"
codebook_size = 16
downsample = 2
steps = 4
batch_size = 4
[generator]
name = "raster"
[model]
n_layer = 1
d_model = 16
n_head = 2
[train]
steps = 3
batch_size = 4
warmup = 1
[metrics]
names = ["nll"]
n_samples = 4
""")
    rec = run(load_config(toml), tmp_path / "out", progress=False)
    assert rec["train"]["steps"] == 3 and not rec["cache"]["model_reused"]
    (store,) = (tmp_path / "out" / "cache").glob("codes-*")
    assert json.loads((store / "store.json").read_text())["complete"]
    again = run(load_config(toml), tmp_path / "out", progress=False)
    assert again["cache"]["model_reused"] and again["metrics"] == rec["metrics"] | {
        k: again["metrics"][k] for k in again["metrics"] if "second" in k}


RANKS_SCRIPT = """
import json, sys, torch
from pathlib import Path
import tokenloom
from tokenloom.backbone import dist
from tokenloom.config import DataConfig
from tokenloom.data import load_dataset
from tokenloom.running.pipeline import encode_all

dist.init_from_env()
cfg = DataConfig(name="shapes", size=8, n=70, n_holdout=8)
sets = {"train": load_dataset(cfg, split="train"), "holdout": load_dataset(cfg, split="holdout")}
tok = tokenloom.create("tokenizer", "pixel", image_shape=(3, 8, 8), bits=2, pool=2)
seen = []
encode = tok.encode
tok.encode = lambda x: (seen.append(int(x.shape[0])), encode(x))[1]
codes = encode_all(tok, "tokA", sets, Path(sys.argv[1]), key_extra={"d": 1}, device=torch.device("cpu"),
                   batch_size=8, shard_rows=16)
same = torch.equal(codes["train"].tensor(), encode(sets["train"].images))
Path(sys.argv[1], f"rank{dist.rank()}.json").write_text(json.dumps({"rows": sum(seen), "same": same}))
dist.shutdown()
"""


@pytest.mark.slow
def test_torchrun_ranks_encode_disjoint_shards_of_one_store(tmp_path, cli_env):
    import subprocess
    import sys

    script = tmp_path / "enc.py"
    script.write_text(RANKS_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path)]
    res = subprocess.run(cmd, env={**cli_env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # 70 + 8 rows in shards of 16: train 0..4 and holdout 0 -> six shards, three per rank, none twice
    assert sum(r["rows"] for r in ranks) == 78 and all(r["rows"] > 0 for r in ranks)
    assert all(r["same"] for r in ranks)
    (store,) = tmp_path.glob("codes-*")
    assert len(list(store.glob("*.npy"))) == 6 and json.loads((store / "store.json").read_text())["complete"]
