"""Conditioning as a plugin kind: the backbone's prefix path (P positions before the codes,
padding, cached decoding), the ``class`` conditioner reproducing the class token bit for bit,
and the registry/hook plumbing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenloom
from tokenloom.config import ModelConfig
from tokenloom.model import build_model
from tokenloom.plugins.conditioners.class_ import ClassConditioner

LAYOUT = tokenloom.TokenLayout(scales=((3, 4),))  # L = 12


def spec(**kw) -> tokenloom.ModelSpec:
    base = {"seq_len": LAYOUT.length, "vocab_size": 10, "heads": (9,), "train_order": "t", "layout": LAYOUT}
    base.update(kw)
    return tokenloom.ModelSpec(**base)


class ToyTokens(tokenloom.Conditioner):
    """A prefix of 4 token ids per condition (left-padded with id 0), for the backbone's tests."""

    class Config:  # not registered: the registry's checks are not needed here
        pass

    prefix_kind = "tokens"

    @property
    def prefix_len(self):
        return 4

    @property
    def prefix_vocab(self):
        return 9

    def encode(self, conditions):
        ids = torch.zeros(len(conditions), 4, dtype=torch.long)
        mask = torch.zeros(len(conditions), 4, dtype=torch.bool)
        for i, c in enumerate(conditions):
            words = [1 + (ord(ch) % 6) for ch in (c.caption or "")][:3] + [7]
            ids[i, 4 - len(words):] = torch.tensor(words)
            mask[i, 4 - len(words):] = True
        return tokenloom.Prefix(mask=mask, ids=ids)

    def null(self):
        return tokenloom.Prefix(mask=torch.tensor([[False, False, False, True]]), ids=torch.tensor([[0, 0, 0, 8]]))


class ToyEmbeddings(ToyTokens):
    prefix_kind = "embeddings"

    @property
    def prefix_dim(self):
        return 5

    def encode(self, conditions):
        p = super().encode(conditions)
        g = torch.Generator().manual_seed(1)
        table = torch.randn(9, 5, generator=g)
        return tokenloom.Prefix(mask=p.mask, embeddings=table[p.ids])

    def null(self):
        return tokenloom.Prefix(mask=torch.tensor([[False, False, False, True]]), embeddings=torch.zeros(1, 4, 5))


CAPTIONS = ["ab", "c", "", "zzzz"]


def prefix_model(kind: str = "tokens", pos: str = "rope2d", seed: int = 0, **kw):
    cond = (ToyTokens if kind == "tokens" else ToyEmbeddings)(None)
    conditions = cond.encode([tokenloom.Condition(caption=c) for c in CAPTIONS])
    cfg = ModelConfig(n_layer=2, d_model=32, n_head=4, pos=pos)
    return build_model(spec(**kw), cfg, n_classes=len(CAPTIONS), seed=seed, conditioner=cond,
                       conditions=conditions).eval()


def test_class_conditioner_reproduces_the_class_token_bit_for_bit():
    cfg = ModelConfig(n_layer=2, d_model=32, n_head=4)
    plain = build_model(spec(), cfg, n_classes=3, seed=4).eval()
    cond = ClassConditioner(ClassConditioner.Config(), n_classes=3)
    table = cond.encode([tokenloom.Condition(label=i) for i in range(3)])
    via = build_model(spec(), cfg, n_classes=3, seed=4, conditioner=cond, conditions=table).eval()
    for (k, a), (k2, b) in zip(plain.state_dict().items(), via.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    x = torch.randint(0, 10, (4, 12), generator=torch.Generator().manual_seed(0))
    c = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        assert torch.equal(plain(x, c), via(x, c))
    assert via.n_classes == 3 and via._identity_table


@settings(max_examples=8, deadline=None, derandomize=True)
@given(kind=st.sampled_from(["tokens", "embeddings"]), pos=st.sampled_from(["rope2d", "learned"]),
       chunk=st.integers(1, 5), seed=st.integers(0, 100))
def test_prefix_cached_decoding_equals_full_recomputation(kind, pos, chunk, seed):
    m = prefix_model(kind, pos, seed)
    B, T = 5, LAYOUT.length
    x = torch.randint(0, 10, (B, T), generator=torch.Generator().manual_seed(seed))
    cond = torch.tensor([0, 1, 2, 3, 4])  # 4: the null condition
    with torch.no_grad():
        full = m(x, cond)
        cache = m.new_cache(B, T)
        inc = torch.cat([m(x[:, s : s + chunk], cond, cache=cache) for s in range(0, T, chunk)], 1)
    assert cache.length == T and cache.offset == 3
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=0)


def test_prefix_conditions_the_output_and_padding_is_invisible():
    m = prefix_model()
    x = torch.randint(0, 10, (1, 12), generator=torch.Generator().manual_seed(0)).repeat(5, 1)
    with torch.no_grad():
        out = m(x, torch.arange(5))
        assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[3], out[4])
        torch.testing.assert_close(m(x[4:], None), out[4:], atol=1e-6, rtol=0)  # None = the null condition
        # a padded prefix position is attended by nobody: changing its id changes nothing
        ids = m.cond_ids.clone()
        assert not m.cond_mask[1, 0]
        m.cond_ids[1, 0] = 5
        torch.testing.assert_close(m(x[1:2], torch.tensor([1])), out[1:2], atol=1e-6, rtol=0)
        m.cond_ids.copy_(ids)
        m.cond_ids[0, 1] = 5  # ... while a real one does: row 0 ("ab") is real from position 1
        assert not torch.allclose(m(x[:1], torch.tensor([0])), out[:1])


def test_prefix_with_a_ragged_cache_and_custom_masks():
    m = prefix_model("tokens", "learned", 0, attention="bidirectional")
    x = torch.randint(0, 10, (3, 12), generator=torch.Generator().manual_seed(2))
    cond = torch.tensor([0, 1, 4])
    with torch.no_grad():
        full = m(x, cond)
        cache = m.new_cache(3, 12)
        m(x[:, :6], cond, cache=cache, attn_mask=torch.ones(6, 6, dtype=torch.bool))
        cache.truncate(0)  # the prefix stays; the sequence restarts at index 0
        again = m(x, cond, cache=cache)
    torch.testing.assert_close(again, full, atol=1e-5, rtol=0)


def test_bad_condition_ids_and_tables_are_input_errors():
    m = prefix_model()
    x = torch.zeros(1, 12, dtype=torch.long)
    for bad in (5, -1):
        with pytest.raises(tokenloom.InputError, match=r"condition ids must lie in \[0, 4\]"):
            m(x, torch.tensor([bad]))
    cond = ToyTokens(None)
    with pytest.raises(tokenloom.InputError, match="last position is real"):
        m.set_conditions(tokenloom.Prefix(mask=torch.zeros(1, 4, dtype=torch.bool), ids=torch.zeros(1, 4).long()),
                         cond.null())
    with pytest.raises(tokenloom.InputError, match=r"prefix ids must lie in \[0, 9\)"):
        m.set_conditions(tokenloom.Prefix(mask=torch.ones(1, 4, dtype=torch.bool), ids=torch.full((1, 4), 9)),
                         cond.null())
    with pytest.raises(tokenloom.InputError, match="2 prefix positions, the model was built for 4"):
        m.set_conditions(tokenloom.Prefix(mask=torch.ones(1, 2, dtype=torch.bool), ids=torch.zeros(1, 2).long()),
                         tokenloom.Prefix(mask=torch.ones(1, 2, dtype=torch.bool), ids=torch.zeros(1, 2).long()))
