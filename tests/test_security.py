"""Nothing under a run directory is ever unpickled (issue 14).

Run directories are shared and downloaded, so a file planted in one must
never run code: the repository is scanned for pickle-based loads, and a
malicious pickle planted where torch-fidelity's feature cache used to live
(and where tokenloom's own feature cache lives) is shown never to execute.
"""

from __future__ import annotations

import ast
import pickle
import warnings
from pathlib import Path

import pytest
import torch

import tokenloom
from tokenloom import fidelity
from tokenloom.config import DataConfig
from tokenloom.data import load_dataset
from tokenloom.interfaces import MetricContext

REPO = Path(__file__).resolve().parents[1]
SIZE = 16

# ---------------------------------------------------------------------------
# The repository-wide scan
# ---------------------------------------------------------------------------


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _kw_true(call: ast.Call, name: str) -> bool | None:
    """True/False when keyword ``name`` is the constant True/False, None when
    absent, and False when it is not a constant (unknown counts as unsafe)."""
    for kw in call.keywords:
        if kw.arg == name:
            return isinstance(kw.value, ast.Constant) and kw.value.value is True
    return None


UNSAFE_ALWAYS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "cPickle.loads",
                 "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load",
                 "marshal.load", "marshal.loads", "shelve.open", "torch.jit.load", "pandas.read_pickle",
                 "pd.read_pickle"}


def unsafe_loads(source: str, filename: str = "<src>") -> list[str]:
    """Every pickle-based load in ``source``: ``torch.load`` without
    ``weights_only=True``, ``np.load``/``numpy.load`` with
    ``allow_pickle=True``, and the pickle family (``pickle.load``, ...)."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "dill", "cloudpickle", "marshal") \
                and any(a.name in ("load", "loads", "Unpickler") for a in node.names):
            found.append(f"{filename}:{node.lineno}: from {node.module} import load")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        where = f"{filename}:{node.lineno}: {name}"
        if name in UNSAFE_ALWAYS:
            found.append(where)
        elif name == "torch.load" and _kw_true(node, "weights_only") is not True:
            found.append(where + " without weights_only=True")
        elif name in ("np.load", "numpy.load") and _kw_true(node, "allow_pickle") is not None \
                and not _is_false(node, "allow_pickle"):
            found.append(where + " with allow_pickle")
    return found


def _is_false(call: ast.Call, name: str) -> bool:
    return any(kw.arg == name and isinstance(kw.value, ast.Constant) and kw.value.value is False
               for kw in call.keywords)


def test_the_scan_catches_every_unsafe_form():
    bad = (
        "import pickle, torch, numpy as np\n"
        "torch.load('a')\n"
        "torch.load('a', weights_only=False)\n"
        "np.load('a', allow_pickle=True)\n"
        "pickle.load(open('a', 'rb'))\n"
        "pickle.loads(b'')\n"
        "torch.jit.load('m.pth')\n"
        "from pickle import loads\n"
    )
    assert len(unsafe_loads(bad)) == 7
    good = "import torch, numpy as np\ntorch.load('a', weights_only=True)\nnp.load('a')\nnp.load('a', allow_pickle=False)\n"
    assert unsafe_loads(good) == []


def test_no_pickle_based_load_in_core_plugins_examples_or_bench():
    files = [f for d in ("core", "plugins", "examples", "bench") for f in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 30
    found = [hit for f in files for hit in unsafe_loads(f.read_text(encoding="utf-8"), str(f.relative_to(REPO)))]
    assert found == [], "pickle-based loads (a file planted in a run directory could run code):\n" + "\n".join(found)


# ---------------------------------------------------------------------------
# A planted pickle is never executed
# ---------------------------------------------------------------------------


class _Evil:
    """Unpickling this writes ``marker`` (what an attacker's payload would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _shapes(n: int, seed: int):
    return load_dataset(DataConfig(name="shapes", size=SIZE, n=n, n_holdout=n), split="train", seed=seed).images


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> str:
    data = load_dataset(DataConfig(name="shapes", size=SIZE, n=256, n_holdout=8), split="train", seed=100)
    net, _ = fidelity.train_extractor(data.images, data.labels, 3, width=8, size=SIZE, steps=20,
                                      batch_size=32, seed=0)
    path = tmp_path_factory.mktemp("extractor") / "tiny.safetensors"
    fidelity.save_extractor(path, net, {"purpose": "tests"})
    return str(path)


def _fid(weights: str, cache: Path, real: torch.Tensor, gen: torch.Tensor) -> float:
    metric = tokenloom.create("metric", "fid", weights=weights, cache_dir=str(cache))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return metric.compute(MetricContext(real=real, generated=gen)).values["fid"]


def test_a_planted_pickle_in_the_feature_cache_is_never_executed(tiny_weights, tmp_path, capsys, monkeypatch):
    real, gen = _shapes(40, seed=1), _shapes(40, seed=2)
    cache = tmp_path / "out" / "cache" / "metrics"
    clean = _fid(tiny_weights, cache, real, gen)
    root = cache / "fidelity"
    written = sorted(root.iterdir())
    assert written and all(p.suffix == ".safetensors" for p in written)  # tokenloom's own cache, no pickle

    marker = tmp_path / "PWNED"
    payload = pickle.dumps({"features": _Evil(marker)})
    # every file name torch-fidelity's pickle cache used for this reference set and extractor
    u8, _ = fidelity.to_uint8_rgb(real, where="r")
    name = f"tl-{fidelity.images_digest(u8)[:20]}-tokenloom-cnn-w{fidelity.load_extractor(tiny_weights)[2][:12]}"
    for old in (f"{name}-tokenloom-cnn-features-features.pt", f"{name}-tokenloom-cnn-features-logits.pt",
                f"{name}-tokenloom-cnn-stat-fid-features.pt"):
        (root / old).write_bytes(payload)
    # and tokenloom's own cache files replaced by the pickle
    for path in written:
        path.write_bytes(payload)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("something tried to unpickle a file")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    capsys.readouterr()
    again = _fid(tiny_weights, cache, real, gen)
    assert not marker.exists()
    assert again == clean  # recomputed, the same number
    err = capsys.readouterr().err
    assert "moved aside" in err and "recomputing" in err
    assert all((p.with_name(p.name + ".corrupt")).is_file() for p in written)
    # the recomputed cache is valid again and is used silently next time
    assert _fid(tiny_weights, cache, real, gen) == clean
    assert "moved aside" not in capsys.readouterr().err


def test_a_corrupt_feature_cache_is_reported_moved_aside_and_recomputed(tiny_weights, tmp_path, capsys):
    real, gen = _shapes(30, seed=3), _shapes(30, seed=4)
    cache = tmp_path / "cache"
    clean = _fid(tiny_weights, cache, real, gen)
    (path,) = sorted((cache / "fidelity").glob("*.safetensors"))
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in the features: safetensors reads it, the content hash does not match
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert _fid(tiny_weights, cache, real, gen) == clean
    err = capsys.readouterr().err
    assert path.name in err and "moved aside" in err
    assert path.with_name(path.name + ".corrupt").is_file() and path.is_file()
    path.write_bytes(b"")  # truncated to nothing
    assert _fid(tiny_weights, cache, real, gen) == clean
    assert "moved aside" in capsys.readouterr().err


def test_a_corrupt_cached_extractor_is_reported_moved_aside_and_retrained(tmp_path, capsys):
    from tokenloom.evaluation.extractor import (
        ExtractorRecipe,
        default_extractor_path,
        load_extractor,
    )

    recipe = ExtractorRecipe(steps=3)
    path = default_extractor_path(recipe, tmp_path)
    digest = load_extractor(path)[2]
    path.write_bytes(pickle.dumps({"weights": _Evil(tmp_path / "PWNED")}))  # corrupt, and a pickle at that
    capsys.readouterr()
    again = default_extractor_path(recipe, tmp_path)
    err = capsys.readouterr().err
    assert again == path and "moved aside" in err and path.name in err
    assert path.with_name(path.name + ".corrupt").is_file() and not (tmp_path / "PWNED").exists()
    assert load_extractor(path)[2] == digest  # retrained from the same seeded recipe: the same weights


def test_reference_stats_holding_a_pickle_are_refused_unread(tiny_weights, tmp_path):
    from tokenloom.errors import InputError

    marker = tmp_path / "PWNED"
    path = tmp_path / "stats.npz"
    path.write_bytes(pickle.dumps({"mu": _Evil(marker)}))  # not a zip: np.load would unpickle it if allowed
    metric = tokenloom.create("metric", "fid", weights=tiny_weights, cache_dir=str(tmp_path / "c"),
                              reference_stats=str(path))
    with pytest.raises(InputError, match="never loads") as exc:
        metric.compute(MetricContext(generated=_shapes(8, seed=5)))
    assert not marker.exists() and "allow_pickle" not in str(exc.value)
