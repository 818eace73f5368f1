"""The conditioners: the conformance kit passes for the built-ins and for a conditioner
written from the interfaces alone (``conformance_pkg.conditioner``), and fails for wrong ones;
the ``caption`` conditioner's bad inputs are said, never a traceback."""

from __future__ import annotations

import types
import warnings

import attrs
import pytest
import torch
from conformance_pkg.conditioner import PLUGIN, Letters

import tokenloom
import tokenloom.testing
from tokenloom.registry import Registry


def _tokenizers_or_skip():
    pytest.importorskip("tokenizers", reason="the caption conditioner needs tokenizers (pip install 'tokenloom[text]')")


def registry_with(name: str, cls: type) -> Registry:
    ns = types.SimpleNamespace(register_conditioners=tokenloom.hookimpl(lambda register: register(name, cls)))
    reg = Registry.from_plugins([(f"wrong-{name}", ns)], strict=True)
    assert reg.available("conditioner") == [name]
    return reg


@pytest.mark.parametrize("name", ["class", "caption"])
def test_the_builtin_conditioners_pass_the_kit(name):
    if name == "caption":
        _tokenizers_or_skip()
    tokenloom.testing.check("conditioner", name)


def test_a_conditioner_from_a_test_package_passes_the_kit():
    reg = Registry.from_plugins([("letters-pkg", PLUGIN)], strict=True)
    assert reg.available("conditioner") == ["letters"]
    tokenloom.testing.check("conditioner", "letters", registry=reg)


class BatchDependent(Letters):
    def encode(self, conditions):
        p = super().encode(conditions)
        return tokenloom.Prefix(mask=p.mask, embeddings=p.embeddings + 0.01 * len(conditions))


class NullIsReal(Letters):
    def null(self):
        return self.encode([tokenloom.Condition(caption="a red circle")])


class SilentOnGarbage(Letters):
    def encode(self, conditions):
        return super().encode([c if isinstance(c, tokenloom.Condition) else tokenloom.Condition() for c in conditions])


class Forgetful(Letters):
    def fit(self, conditions):
        self.table = self.table + 1.0  # learned from the data, but not in state()


@pytest.mark.parametrize(("cls", "match"), [
    (BatchDependent, "depends on its batch"),
    (NullIsReal, "null condition equals"),
    (SilentOnGarbage, "accepted silently"),
    (Forgetful, "does not restore"),
])
def test_a_wrong_conditioner_fails(cls, match):
    with pytest.raises(AssertionError, match=match):
        tokenloom.testing.check("conditioner", "wrong", registry=registry_with("wrong", cls))


def caption(**kw):
    _tokenizers_or_skip()
    c = tokenloom.create("conditioner", "caption", **kw)
    c.fit([tokenloom.Condition(caption=t) for t in ("a red circle", "two squares, blue and yellow")])
    return c


def test_caption_unknown_words_are_said_once_and_read_as_unk():
    c = caption()
    with pytest.warns(UserWarning, match="not in the vocabulary.*purple"):
        a = c.encode([tokenloom.Condition(caption="two purple squares")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: the second time is silent
        b = c.encode([tokenloom.Condition(caption="two purple squares")])
    assert torch.equal(a.ids, b.ids)
    unk = c.vocabulary.token_to_id("[UNK]")
    assert int((a.ids == unk).sum()) == 1 and a.mask.sum() == 4  # two [UNK] squares [END]


def test_caption_empty_prompt_is_the_null_condition_and_long_ones_are_truncated():
    c = caption(max_words=3)
    with pytest.warns(UserWarning, match="null condition"):
        empty = c.encode([tokenloom.Condition(caption="   ")])
    null = c.null()
    assert torch.equal(empty.ids, null.ids) and torch.equal(empty.mask, null.mask)
    with pytest.warns(UserWarning, match="truncated to max_words = 3"):
        long = c.encode([tokenloom.Condition(caption="two squares, blue and yellow")])
    assert long.mask.all() and long.ids.shape == (1, 4)
    # case and spacing do not matter
    a, b = c.encode([tokenloom.Condition(caption="a red circle"), tokenloom.Condition(caption="A  RED circle")]).ids
    assert torch.equal(a, b)


def test_caption_refuses_labels_and_an_unfitted_vocabulary():
    c = caption()
    with pytest.raises(tokenloom.InputError, match="reads captions, got only a class label"):
        c.encode([tokenloom.Condition(label=1)])
    fresh = tokenloom.create("conditioner", "caption")  # (tokenizers is there: caption() above)
    with pytest.raises(tokenloom.InputError, match="no vocabulary yet"):
        fresh.encode([tokenloom.Condition(caption="a red circle")])
    with pytest.raises(tokenloom.InputError, match="no captions to fit"):
        fresh.fit([tokenloom.Condition(label=0)] * 0 + [tokenloom.Condition(caption="")])


def test_class_conditioner_errors_name_the_condition():
    c = tokenloom.create("conditioner", "class", n_classes=3)
    with pytest.raises(tokenloom.InputError, match=r"conditions\[1\].label: expected a class id in \[0, 3\)"):
        c.encode([tokenloom.Condition(label=0), tokenloom.Condition(label=3)])
    with pytest.raises(tokenloom.InputError, match="use \\[conditioner\\] name = \"caption\""):
        c.encode([tokenloom.Condition(caption="a red circle")])
    assert attrs.asdict(c.config) == {}
