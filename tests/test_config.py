"""Config files: every problem reported at once with its path, no traceback."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import tokenloom
from tokenloom.config import config_to_dict, load_config, parse_config
from tokenloom.contract.structure import describe, format_error, structure_config

GOOD = """
seed = 3
[data]
name = "shapes"
size = 16
n = 100
[tokenizer]
name = "pixel"
bits = 2
pool = 4
[generator]
name = "raster"
[[sampler]]
name = "temperature"
t = 0.9
[[sampler]]
name = "top-k"
k = 8
"""


def write(tmp_path, text: str):
    path = tmp_path / "run.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_good_config_structures_each_component(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.seed == 3 and cfg.data.size == 16
    assert cfg.tokenizer.name == "pixel" and cfg.tokenizer.config.pool == 4
    assert [s.name for s in cfg.sampler] == ["temperature", "top-k"]
    assert cfg.sampler[1].config.k == 8
    again = parse_config(config_to_dict(cfg))
    assert config_to_dict(again) == config_to_dict(cfg)


def test_three_problems_reported_together(tmp_path):
    path = write(tmp_path, """
        [tokenizer]
        name = "pixel"
        bitz = 3
        pool = "big"
        [[sampler]]
        name = "temperature"
        [[sampler]]
        name = "topk"
        k = 4
        """)
    with pytest.raises(tokenloom.ConfigError) as exc:
        load_config(path)
    problems = exc.value.problems
    assert len(problems) == 3, problems
    assert any(p.startswith("tokenizer.bitz: unknown key (did you mean 'bits'?") for p in problems)
    assert "tokenizer.pool: expected int, got 'big'" in problems
    assert any(p.startswith("sampler[1].name: unknown sampler 'topk' (did you mean 'top-k'? available:") for p in problems)
    assert str(path) in str(exc.value)


def test_cli_check_prints_problems_without_traceback(tmp_path):
    bad = write(tmp_path, '[tokenizer]\nname = "pixel"\nbits = 2.5\n[trian]\nsteps = 3\n')
    out = subprocess.run([sys.executable, "-m", "tokenloom", "check", str(bad)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2
    assert "tokenizer.bits: expected int, got 2.5" in out.stderr
    assert "trian: unknown key (did you mean 'train'?" in out.stderr
    assert "Traceback" not in out.stderr
    good = write(tmp_path, GOOD)
    ok = subprocess.run([sys.executable, "-m", "tokenloom", "check", str(good)],
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "ok" in ok.stdout, ok.stderr


def test_composition_errors_are_caught_by_check(tmp_path):
    path = write(tmp_path, '[data]\nsize = 10\n[tokenizer]\nname = "pixel"\npool = 4\n')
    out = subprocess.run([sys.executable, "-m", "tokenloom", "check", str(path)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2 and "pool = 4 does not divide the image size 10×10" in out.stderr


@pytest.mark.parametrize(
    "table, needle",
    [
        ({"name": "top-p", "p": 0.0}, "sampler[0].p: must be in (0, 1], got 0.0"),
        ({"name": "top-p", "p": 1.5}, "sampler[0].p: must be in (0, 1], got 1.5"),
        ({"name": "top-k", "k": 0}, "sampler[0].k:"),
        ({"name": "temperature", "t": -1.0}, "sampler[0].t: must be > 0"),
        ({"name": "min-p", "min_p": 2.0}, "sampler[0].min_p: must be in [0, 1]"),
        ({"name": "typical", "mass": 0}, "sampler[0].mass: must be in (0, 1]"),
        ({"name": "top-k", "k": 2.5}, "sampler[0].k: expected int, got 2.5"),
        ({"name": "top-k", "k": True}, "sampler[0].k: expected int, got True"),
        ({"name": "temperature", "t": "hot"}, "sampler[0].t: expected float, got 'hot'"),
        ({"name": 3}, "sampler[0].name: expected string, got 3"),
        ({"k": 3}, "sampler[0].name: missing"),
    ],
)
def test_invalid_sampler_parameters_are_config_errors(table, needle):
    with pytest.raises(tokenloom.ConfigError) as exc:
        parse_config({"sampler": [table]})
    assert any(p.startswith(needle) for p in exc.value.problems), exc.value.problems


def test_sections_and_top_level_are_checked():
    with pytest.raises(tokenloom.ConfigError) as exc:
        parse_config({"seed": -1, "model": {"d_model": 30, "n_head": 4}, "train": {"lr": "fast"},
                      "metrics": {"names": ["nope"]}})
    problems = exc.value.problems
    assert any(p.startswith("seed:") for p in problems)
    assert any(p.startswith("model:") and "divisible" in p for p in problems)
    assert "train.lr: expected float, got 'fast'" in problems
    assert any(p.startswith("metrics.names[0].name: unknown metric 'nope'") for p in problems)


def test_invalid_toml_is_a_config_error(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[tokenizer\nname = 1\n")
    with pytest.raises(tokenloom.ConfigError, match="invalid TOML"):
        load_config(path)
    with pytest.raises(tokenloom.ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml")


def test_structure_config_nested_types():
    import attrs

    @attrs.frozen
    class C:
        levels: tuple[int, ...] = (8, 5)
        scales: tuple[tuple[int, int], ...] = ((1, 1),)

    assert structure_config(C, {"levels": [4, 4, 4], "scales": [[1, 1], [2, 2]]}, "x") == C((4, 4, 4), ((1, 1), (2, 2)))
    with pytest.raises(tokenloom.ConfigError) as exc:
        structure_config(C, {"levels": [4, "x"]}, "tokenizer")
    assert exc.value.problems == ["tokenizer.levels[1]: expected int, got 'x'"]


def test_structuring_lives_in_its_own_module_and_the_old_paths_still_resolve():
    import tokenloom.config
    import tokenloom.registry

    # one implementation, reachable under the names code has always imported
    assert tokenloom.config.structure_config is structure_config
    assert tokenloom.config.build_component is tokenloom.registry.build_component
    assert describe({}) == "a table" and describe([1]) == "a list" and describe(3.5) == "3.5"
    assert format_error(RuntimeError("boom"), "train.lr") == ["train.lr: boom"]


def test_strict_primitives_and_unknown_keys_are_all_reported():
    import attrs

    @attrs.frozen
    class C:
        n: int = 1
        x: float = 0.5
        on: bool = False
        name: str = "a"

    assert structure_config(C, {"n": 2, "x": 1, "on": True, "name": "b"}, "t") == C(2, 1.0, True, "b")
    with pytest.raises(tokenloom.ConfigError) as exc:
        structure_config(C, {"n": 3.5, "x": "3", "on": 1, "name": 2, "nam": "z"}, "t")
    assert exc.value.problems == [
        "t.n: expected int, got 3.5",
        "t.x: expected float, got '3'",
        "t.on: expected bool (true/false), got 1",
        "t.name: expected string, got 2",
        "t.nam: unknown key (did you mean 'name'? known keys: n, name, on, x)",
    ]
    with pytest.raises(tokenloom.ConfigError, match=r"t: expected a table, got a list"):
        structure_config(C, [1], "t")
