"""The written contract of tokenloom.interfaces against core's classes: what a
generator receives (Backbone, Cache, Chain, RNG) is what core hands over, the
built-in generators use the documented signature, the ``exact`` rule has one
definition, and a tokenizer that forgets its constructor arguments is told
the call to write."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import typing

import attrs
import pytest
import torch

import tokenloom
import tokenloom.plugins.generators as generator_plugins
import tokenloom.plugins.samplers.exact as exact_plugin
import tokenloom.plugins.samplers.top_k as top_k_plugin
from tokenloom.config import ModelConfig
from tokenloom.interfaces import RNG, Backbone, Cache, Chain
from tokenloom.model import InstrumentedModel, build_model
from tokenloom.orders import raster_spec
from tokenloom.registry import Registry
from tokenloom.rng import RowRNG
from tokenloom.sampling import ExactRule, SamplerChain
from tokenloom.speculative import acceptance_rule


class _Tok:  # just what raster_spec reads
    layout = tokenloom.TokenLayout(scales=((2, 3),))
    vocab_size = 5


def _top_k(k: int) -> tokenloom.Sampler:  # built directly: no process-wide registry
    return top_k_plugin.TopK(top_k_plugin.TopK.Config(k=k))


def _backbone() -> InstrumentedModel:
    spec = raster_spec(_Tok())
    return InstrumentedModel(build_model(spec, ModelConfig(n_layer=1, d_model=16, n_head=2), n_classes=3).eval())


def _members(protocol: type) -> set[str]:
    """The names a protocol declares (attributes, properties and methods)."""
    own = set(vars(protocol)) | set(getattr(protocol, "__annotations__", {}))
    return {n for n in own if not n.startswith("_") or n in ("__call__", "__len__")} - {
        "__annotations__", "__parameters__"}


# -- core's classes satisfy the protocols ---------------------------------------


@pytest.mark.parametrize("protocol,make", [
    (Backbone, _backbone),
    (Cache, lambda: _backbone().new_cache(2, 4)),
    (Chain, lambda: SamplerChain([_top_k(2)])),
    (RNG, lambda: RowRNG(0, [0, 1])),
], ids=lambda v: getattr(v, "__name__", ""))
def test_core_objects_satisfy_the_protocols_member_by_member(protocol, make):
    obj = make()
    assert isinstance(obj, protocol)
    members = _members(protocol)
    assert members, f"{protocol.__name__} declares nothing"
    missing = sorted(m for m in members if not hasattr(obj, m))
    assert not missing, f"{type(obj).__name__} lacks {missing} of {protocol.__name__}"
    for m in members:  # a method of the protocol is a method here too
        if callable(getattr(protocol, m, None)) and not isinstance(getattr(protocol, m), property):
            assert callable(getattr(obj, m)), f"{type(obj).__name__}.{m} is not callable"


def test_objects_missing_a_member_are_not_the_protocol():
    assert not isinstance([_top_k(2)], Chain)  # a bare list is no chain
    assert not isinstance(_backbone().model, Backbone)  # the bare transformer: no null_class, device
    assert not isinstance(torch.Generator(), RNG)


def test_every_backbone_keyword_is_one_the_transformer_accepts():
    call = inspect.signature(Backbone.__call__).parameters
    keywords = {n for n, p in call.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keywords >= {"positions", "target_positions", "attn_mask", "cache", "last_only", "return_hidden"}
    forward = inspect.signature(type(_backbone().model).forward).parameters
    assert keywords <= set(forward), f"documented but not accepted: {sorted(keywords - set(forward))}"


def test_the_documented_call_returns_the_documented_shapes():
    model = _backbone()
    cache = model.new_cache(2, 6)
    assert cache.batch_size == 2 and cache.length == 0 and not cache.ragged
    logits = model(torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, model.null_class]), cache=cache,
                   positions=torch.tensor([tokenloom.NO_POSITION, 0, 1]))
    assert logits.shape == (2, 3, 5) and cache.length == 3 and model.nfe == 1
    cache.truncate(torch.tensor([1, 2]))
    assert cache.ragged and cache.row_lengths().tolist() == [1, 2]
    hidden = model(torch.zeros(2, 1, dtype=torch.long), None, cache=cache, return_hidden=True)
    assert hidden.shape == (2, 1, 16)
    assert model(torch.zeros(2, 1, dtype=torch.long), None, cache=cache, last_only=True).shape == (2, 1, 5)


def test_chain_process_is_the_call_and_sample_is_process_then_draw():
    chain = SamplerChain([_top_k(2)])
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 4.0, -1.0]])
    info = tokenloom.StepInfo(step=3, n_steps=8)
    processed = chain.process(logits, info)
    assert torch.equal(processed, chain(logits, info))
    assert torch.isinf(processed).sum(-1).tolist() == [2, 2]
    rng = RowRNG(1, [0, 1])
    assert torch.equal(chain.sample(logits, info, rng), chain.draw(processed, RowRNG(1, [0, 1]), 3))
    assert not chain.needs_uncond and not chain.greedy and chain.acceptance is None


# -- generators: the documented signature -------------------------------------------


def _builtin_generators() -> Registry:
    modules = [(m.name, importlib.import_module(f"{generator_plugins.__name__}.{m.name}"))
               for m in pkgutil.iter_modules(generator_plugins.__path__)]
    return Registry.from_plugins(modules, strict=True)


def test_every_builtin_generator_takes_model_chain_cond_rng_known():
    registry = _builtin_generators()
    names = registry.available("generator")
    assert len(names) >= 15
    want = list(inspect.signature(tokenloom.Generator.generate).parameters)
    assert want == ["self", "model", "chain", "cond", "rng", "known"]
    for name in names:
        cls = registry.get("generator", name).cls
        got = list(inspect.signature(cls.generate).parameters)
        assert got == want, f"generator {name!r}: generate{tuple(got)} differs from the contract's"


def test_generate_is_typed_with_the_protocols():
    hints = typing.get_type_hints(tokenloom.Generator.generate)
    assert hints["model"] is Backbone and hints["chain"] is Chain and hints["rng"] is RNG
    assert typing.get_type_hints(tokenloom.Generator.log_likelihood)["model"] is Backbone


# -- one exact acceptance rule -------------------------------------------------------


def test_the_exact_plugin_is_cores_exact_rule():
    assert issubclass(exact_plugin.Exact, ExactRule)
    assert "accept" not in vars(exact_plugin.Exact) and "residual" not in vars(exact_plugin.Exact)
    rule = acceptance_rule(SamplerChain())
    assert type(rule) is ExactRule and rule.role == "acceptance"
    p = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.75, 0.0]], dtype=torch.float64)
    # accept x with probability min(1, p/q): token 0 always, token 1 when u < 2/3
    assert rule.accept(p, q, torch.tensor([0]), torch.tensor([0.99])).tolist() == [True]
    assert rule.accept(p, q, torch.tensor([1]), torch.tensor([0.6])).tolist() == [True]
    assert rule.accept(p, q, torch.tensor([1]), torch.tensor([0.7])).tolist() == [False]
    assert torch.allclose(rule.residual(p, q), torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))
    chain = SamplerChain([exact_plugin.Exact(exact_plugin.Exact.Config())])
    assert isinstance(acceptance_rule(chain), ExactRule) and acceptance_rule(chain) is chain.acceptance


# -- the tokenizer constructor ---------------------------------------------------------


class _TorchHabit(tokenloom.Tokenizer):
    @attrs.frozen
    class Config:
        bits: int = 1

    def __init__(self, config, *, image_shape):
        super().__init__()  # the torch habit: no arguments


class _HalfWay(tokenloom.Tokenizer):
    @attrs.frozen
    class Config:
        bits: int = 1

    def __init__(self, config, *, image_shape):
        super().__init__(config)  # forgot the image shape


def test_a_tokenizer_calling_super_init_without_arguments_is_shown_the_call():
    with pytest.raises(TypeError, match=r"super\(\)\.__init__\(config, image_shape=image_shape\)") as err:
        _TorchHabit(_TorchHabit.Config(), image_shape=(3, 8, 8))
    assert "_TorchHabit" in str(err.value) and "config and image_shape missing" in str(err.value)
    with pytest.raises(TypeError, match=r"image_shape missing"):
        _HalfWay(_HalfWay.Config(), image_shape=(3, 8, 8))


def test_a_tokenizer_passing_its_arguments_on_is_built():
    class Fine(tokenloom.Tokenizer):
        @attrs.frozen
        class Config:
            bits: int = 1

        def __init__(self, config, *, image_shape):
            super().__init__(config, image_shape=image_shape)

    tok = Fine(Fine.Config(bits=2), image_shape=[3, 8, 8])
    assert tok.config.bits == 2 and tok.image_shape == (3, 8, 8)
