"""Plugin discovery, failure isolation, strict/disable switches, lookups."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import attrs
import pytest
from conftest import make_dist

import tokenloom
import tokenloom.testing
from tokenloom.registry import Registry, build_component, set_registry

GOOD_PLUGIN = '''
import attrs, torch, tokenloom

class Halftone(tokenloom.Tokenizer):
    """One bit per pixel: luminance above zero or not."""
    @attrs.frozen
    class Config:
        threshold: float = 0.0

    def __init__(self, config, *, image_shape):
        super().__init__(config, image_shape=image_shape)
        c, h, w = self.image_shape
        self.layout = tokenloom.TokenLayout(scales=((h, w),))
        self.vocab_size = 2

    def encode(self, images):
        images = self.check_images(images)
        return (images.mean(1) > self.config.threshold).long().flatten(1)

    def decode(self, codes):
        codes = self.check_codes(codes)
        c, h, w = self.image_shape
        return (codes.float() * 2 - 1).view(-1, 1, h, w).expand(-1, c, h, w).contiguous()

    def code_embeddings(self):
        return torch.tensor([[-1.0], [1.0]])

@tokenloom.hookimpl
def register_tokenizers(register):
    register("halftone", Halftone)
'''

BROKEN_PLUGIN = '''
raise RuntimeError("this plugin is broken on purpose")
'''


@pytest.fixture
def fresh_registry():
    """Build the global registry anew for the test and restore it after."""
    previous = set_registry(None)
    yield
    set_registry(previous)


def test_builtins_are_discovered_through_entry_points():
    reg = Registry.from_entry_points(disabled=[], strict=False)
    names = {e.name: e for e in reg.entries("sampler")}
    assert {"greedy", "temperature", "top-k", "top-p", "min-p", "typical"} <= set(names)
    assert names["top-p"].dist == "tokenloom" and names["top-p"].version == tokenloom.__version__
    assert names["top-p"].module == "tokenloom.plugins.samplers.top_p"
    assert "pixel" in reg.available("tokenizer")
    # every built-in entry point is its own plugin
    assert {"pixel", "top-p", "greedy"} <= {p.name for p in reg.plugins}


def test_registry_is_not_built_at_import():
    code = "import tokenloom, tokenloom.registry as r; print(r._registry is None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_third_party_package_is_discovered_created_and_conformant(tmp_path, on_path, fresh_registry):
    on_path(make_dist(tmp_path / "site", "tokenloom-halftone", "1.2.3", "tokenloom_halftone", GOOD_PLUGIN))
    assert "halftone" in tokenloom.available("tokenizer")
    entry = tokenloom.get_registry().get("tokenizer", "halftone")
    assert (entry.dist, entry.version, entry.plugin) == ("tokenloom-halftone", "1.2.3", "tokenloom_halftone")
    tok = tokenloom.create("tokenizer", "halftone", threshold=0.5, image_shape=(1, 4, 4))
    assert tok.layout.length == 16 and tok.config.threshold == 0.5
    tokenloom.testing.check("tokenizer", "halftone", image_shape=(3, 8, 8))


def test_broken_package_is_recorded_and_the_rest_works(tmp_path, on_path):
    on_path(make_dist(tmp_path / "site", "tokenloom-broken", "0.0.1", "tokenloom_broken", BROKEN_PLUGIN))
    reg = Registry.from_entry_points(disabled=[], strict=False)
    [failure] = [f for f in reg.failures if f.plugin == "tokenloom_broken"]
    assert failure.dist == "tokenloom-broken" and failure.version == "0.0.1" and failure.stage == "import"
    assert "broken on purpose" in failure.error
    assert "top-k" in reg.available("sampler")
    with pytest.raises(tokenloom.PluginError, match="tokenloom_broken.*tokenloom-broken"):
        Registry.from_entry_points(disabled=[], strict=True)
    reg = Registry.from_entry_points(disabled=["tokenloom_broken"], strict=True)
    assert reg.disabled == ["tokenloom_broken"] and not reg.failures


def test_cli_lists_plugins_and_failures(tmp_path, cli_env):
    site = tmp_path / "site"
    make_dist(site, "tokenloom-halftone", "1.2.3", "tokenloom_halftone", GOOD_PLUGIN)
    make_dist(site, "tokenloom-broken", "0.0.1", "tokenloom_broken", BROKEN_PLUGIN)
    cli_env["PYTHONPATH"] = str(site)
    cmd = [sys.executable, "-m", "tokenloom", "plugins"]
    out = subprocess.run(cmd + ["--json"], capture_output=True, text=True, check=False, env=cli_env)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    tok = {e["name"]: e for e in report["components"]["tokenizer"]}
    assert tok["halftone"]["distribution"] == "tokenloom-halftone" and tok["halftone"]["version"] == "1.2.3"
    assert tok["pixel"]["distribution"] == "tokenloom"
    assert any(f["dist"] == "tokenloom-broken" and "broken on purpose" in f["error"] for f in report["failures"])

    text = subprocess.run(cmd, capture_output=True, text=True, check=False, env=cli_env)
    assert text.returncode == 0 and "halftone" in text.stdout and "tokenloom-broken" in text.stdout

    strict = subprocess.run(cmd, capture_output=True, text=True, check=False,
                            env={**cli_env, "TOKENLOOM_STRICT_PLUGINS": "1"})
    assert strict.returncode != 0
    assert "tokenloom_broken" in strict.stderr and "Traceback" not in strict.stderr

    skip = subprocess.run(cmd + ["--json"], capture_output=True, text=True, check=False,
                          env={**cli_env, "TOKENLOOM_STRICT_PLUGINS": "1", "TOKENLOOM_DISABLE_PLUGINS": "tokenloom_broken"})
    assert skip.returncode == 0, skip.stderr
    assert json.loads(skip.stdout)["disabled"] == ["tokenloom_broken"]


def test_pip_installed_package_is_discovered(tmp_path, cli_env):
    """The real install path: build and install a throwaway distribution with
    pip into a target directory, then list it through the CLI."""
    src = tmp_path / "src"
    make_dist(src, "unused", "0", "tokenloom_halftone", GOOD_PLUGIN)
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "tokenloom-halftone"\nversion = "2.0.0"\n'
        '[project.entry-points.tokenloom]\nhalftone = "tokenloom_halftone"\n'
        '[tool.setuptools]\npackages = ["tokenloom_halftone"]\n'
    )
    for p in src.glob("*.dist-info"):
        for f in p.iterdir():
            f.unlink()
        p.rmdir()
    target = tmp_path / "target"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(src)], check=True, capture_output=True)
    cli_env["PYTHONPATH"] = str(target)
    out = subprocess.run([sys.executable, "-m", "tokenloom", "plugins", "--json"], capture_output=True,
                         text=True, env=cli_env, check=True)
    tok = {e["name"]: e for e in json.loads(out.stdout)["components"]["tokenizer"]}
    assert tok["halftone"]["distribution"] == "tokenloom-halftone" and tok["halftone"]["version"] == "2.0.0"


def test_example_plugin_is_installed_and_listed():
    """`make test` installs examples/tokenloom-example-plugin like a user would."""
    reg = Registry.from_entry_points(disabled=[], strict=False)
    entry = reg.get("tokenizer", "palette")
    assert entry.dist == "tokenloom-palette" and entry.module == "tokenloom_palette"


# -- registries built from named plugins ------------------------------------


class _Tok(tokenloom.Tokenizer):
    @attrs.frozen
    class Config:
        pass


def _plugin(**hooks) -> types.SimpleNamespace:
    ns = types.SimpleNamespace()
    for hook, fn in hooks.items():
        setattr(ns, hook, tokenloom.hookimpl(fn))
    return ns


def test_invalid_components_are_recorded_per_plugin():
    class NoConfig(tokenloom.Tokenizer):
        pass

    def bad(register):
        register("Bad Name", _Tok)
        register("not-a-class", object())
        register("wrong-base", dict)
        register("no-config", NoConfig)
        register("fine", _Tok)

    reg = Registry.from_plugins([("bad", _plugin(register_tokenizers=bad))])
    assert reg.available("tokenizer") == ["fine"]
    errors = " | ".join(f.error for f in reg.failures)
    assert len(reg.failures) == 4 and all(f.plugin == "bad" and f.stage == "component" for f in reg.failures)
    for needle in ("invalid tokenizer name 'Bad Name'", "expected a class", "does not derive", "no nested attrs class"):
        assert needle in errors


def test_a_hook_that_raises_registers_nothing():
    def half(register):
        register("first", _Tok)
        raise ValueError("boom")

    def other(register):
        register("other", _Tok)

    reg = Registry.from_plugins([("half", _plugin(register_tokenizers=half)), ("ok", _plugin(register_tokenizers=other))])
    assert reg.available("tokenizer") == ["other"]
    [f] = reg.failures
    assert f.plugin == "half" and f.stage == "hook" and "boom" in f.error


def test_duplicate_names_name_both_distributions():
    a = _plugin(register_tokenizers=lambda register: register("twin", _Tok))
    b = _plugin(register_tokenizers=lambda register: register("twin", _Tok))
    reg = Registry()
    from tokenloom.registry import PluginSource

    reg._load([PluginSource("a", "dist-a", "1", "a", lambda: a), PluginSource("b", "dist-b", "2", "b", lambda: b)],
              strict=False)
    assert "twin" not in reg.available("tokenizer")
    [f] = reg.failures
    assert "dist-a" in f.error and "dist-b" in f.error
    with pytest.raises(tokenloom.PluginError, match="dist-a.*dist-b"):
        reg.get("tokenizer", "twin")


def test_unknown_name_lists_available_and_closest():
    reg = Registry.from_entry_points(disabled=[], strict=False)
    with pytest.raises(tokenloom.UnknownComponentError) as exc:
        reg.get("sampler", "topk")
    msg = str(exc.value)
    assert "did you mean 'top-k'" in msg and "typical" in msg and "greedy" in msg
    with pytest.raises(tokenloom.UnknownComponentError, match="kinds: tokenizer, generator"):
        reg.available("colour")


def test_create_reports_bad_config_values():
    with pytest.raises(tokenloom.ConfigError) as exc:
        tokenloom.create("sampler", "top-p", p=1.5, q=2)
    problems = exc.value.problems
    assert any(p.startswith("sampler.p:") and "(0, 1]" in p for p in problems)
    assert any(p.startswith("sampler.q: unknown key") for p in problems)
    tok = tokenloom.create("tokenizer", "pixel", bits=1, image_shape=(1, 4, 4))
    assert tok.vocab_size == 2


def test_build_component_and_check_kind_are_the_registry_s_public_api():
    from tokenloom.plugins.samplers import top_k

    reg = Registry.from_plugins([("top_k", top_k)])
    assert Registry.check_kind("samplers") == "sampler" and reg.check_kind("sampler") == "sampler"
    with pytest.raises(tokenloom.UnknownComponentError, match="unknown component kind 'sampelr'"):
        Registry.check_kind("sampelr")
    proc = build_component(reg, "samplers", "top-k", {"k": 3}, path="sampler[0]")
    assert proc.config.k == 3
    with pytest.raises(tokenloom.ConfigError) as exc:
        build_component(reg, "sampler", "top-k", {"k": "3", "q": 1}, path="sampler[0]")
    assert exc.value.problems[0] == "sampler[0].k: expected int, got '3'"
    assert exc.value.problems[1].startswith("sampler[0].q: unknown key")
    with pytest.raises(tokenloom.UnknownComponentError, match="available: top-k"):
        build_component(reg, "sampler", "top-p", {}, path="sampler[0]")
