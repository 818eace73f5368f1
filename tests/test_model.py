"""The backbone: KV-cached decoding equals recomputation, masks do what they
say, heads, positions, class conditioning and the instrumented wrapper."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenloom
from tokenloom.backbone.instrumented import InstrumentedModel
from tokenloom.backbone.kvcache import KVCache
from tokenloom.config import ModelConfig
from tokenloom.model import (
    apply_rope,
    block_causal_mask,
    build_model,
    layout_coordinates,
    rope2d_table,
)

LAYOUT = tokenloom.TokenLayout(scales=((3, 4),))  # L = 12


def spec(**kw) -> tokenloom.ModelSpec:
    base = {"seq_len": LAYOUT.length, "vocab_size": 10, "heads": (9,), "train_order": "t", "layout": LAYOUT}
    base.update(kw)
    return tokenloom.ModelSpec(**base)


def model(pos: str = "rope2d", seed: int = 0, **kw) -> torch.nn.Module:
    cfg = ModelConfig(n_layer=2, d_model=32, n_head=4, pos=pos)
    return build_model(spec(**kw), cfg, n_classes=3, seed=seed).eval()


def tokens(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 10, (B, T), generator=torch.Generator().manual_seed(seed))


@settings(max_examples=12, deadline=None, derandomize=True)
@given(pos=st.sampled_from(["rope2d", "learned"]), chunk=st.integers(1, 5), per_row=st.booleans(),
       seed=st.integers(0, 1000))
def test_kv_cached_decoding_equals_full_recomputation(pos, chunk, per_row, seed):
    m = model(pos, seed=seed)
    B, T = 3, LAYOUT.length
    x = tokens(B, T, seed)
    cond = torch.tensor([0, 2, 3])  # 3 = the null class
    if per_row:  # every row its own order of positions (RandAR-style)
        g = torch.Generator().manual_seed(seed)
        positions = torch.stack([torch.cat([torch.tensor([-1]), torch.randperm(T - 1, generator=g)]) for _ in range(B)])
    else:
        positions = torch.arange(-1, T - 1).expand(B, T)
    with torch.no_grad():
        full = m(x, cond, positions=positions)  # (B, T, V)
        cache = m.new_cache(B, T)
        parts = []
        for s in range(0, T, chunk):
            parts.append(m(x[:, s : s + chunk], cond, positions=positions[:, s : s + chunk], cache=cache))
        inc = torch.cat(parts, 1)
    assert cache.length == T
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=0)


def test_truncate_rolls_back_and_recomputes_identically():
    m = model()
    x = tokens(2, 10, 1)
    with torch.no_grad():
        cache = m.new_cache(2, 12)
        m(x[:, :6], None, cache=cache)
        ref = m(x[:, 6:8], None, cache=cache, positions=torch.arange(5, 7))
        m(tokens(2, 3, 9), None, cache=cache, positions=torch.arange(7, 10))  # a draft that gets rejected
        assert cache.length == 11
        cache.truncate(6)
        again = m(x[:, 6:8], None, cache=cache, positions=torch.arange(5, 7))
    torch.testing.assert_close(again, ref, atol=1e-6, rtol=0)
    with pytest.raises(tokenloom.InputError):
        cache.truncate(99)
    with pytest.raises(tokenloom.InputError, match="overflow"):
        m(tokens(2, 5), None, cache=cache)


def test_causal_mask_hides_the_future_and_bidirectional_does_not():
    x = tokens(1, 12, 2)
    y = x.clone()
    y[0, 7] = (x[0, 7] + 1) % 10
    causal, bidir = model(), model(attention="bidirectional")
    with torch.no_grad():
        a, b = causal(x), causal(y)
        torch.testing.assert_close(a[:, :7], b[:, :7], atol=0, rtol=0)
        assert not torch.allclose(a[:, 7:], b[:, 7:])
        a, b = bidir(x), bidir(y)
        assert not torch.allclose(a[:, :7], b[:, :7])


def test_custom_and_block_causal_masks():
    x = tokens(2, 12, 3)
    sizes = (1, 3, 8)
    block = model(attention="block-causal", extra=(("block_sizes", sizes),))
    mask = block_causal_mask(sizes)
    assert mask.shape == (12, 12)
    assert mask[0, 0] and not mask[0, 1] and mask[3, 1] and mask[2, 3] and not mask[3, 4] and mask[11, 0]
    custom = model(attention="custom")
    custom.load_state_dict(block.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(block(x), custom(x, attn_mask=mask), atol=1e-6, rtol=0)
        # tokens of the last block do not reach the first four positions
        y = x.clone()
        y[:, 6] = (x[:, 6] + 3) % 10
        torch.testing.assert_close(block(x)[:, :4], block(y)[:, :4], atol=0, rtol=0)
        # a per-row mask: row 1 sees only itself
        eye = torch.eye(12, dtype=torch.bool)
        rows = torch.stack([torch.ones(12, 12, dtype=torch.bool).tril(), eye])
        out = custom(x, attn_mask=rows)
        z = x.clone()
        z[1, 5:] = (x[1, 5:] + 1) % 10
        torch.testing.assert_close(out[1, :5], custom(z, attn_mask=rows)[1, :5], atol=0, rtol=0)
    with pytest.raises(tokenloom.InputError, match="attn_mask"):
        custom(x)
    with pytest.raises(tokenloom.InputError, match="attn_mask"):
        custom(x, attn_mask=torch.ones(5, 5, dtype=torch.bool))


def test_several_heads_and_their_loss():
    from tokenloom.train import batch_loss

    m = model(heads=(9, 4))
    x = tokens(2, 12)
    with torch.no_grad():
        out = m(x, torch.zeros(2, dtype=torch.long))
    assert isinstance(out, tuple) and out[0].shape == (2, 12, 9) and out[1].shape == (2, 12, 4)
    targets = torch.stack([torch.randint(0, 9, (2, 12)), torch.randint(0, 4, (2, 12))], -1)
    mask = torch.ones(2, 12, 2, dtype=torch.bool)
    mask[..., 1] = False  # only the first head counts
    batch = tokenloom.TrainBatch(inputs=x, targets=targets, loss_mask=mask, cond=torch.zeros(2, dtype=torch.long))
    with torch.no_grad():
        expect = torch.nn.functional.cross_entropy(out[0].flatten(0, 1), targets[..., 0].flatten())
        torch.testing.assert_close(batch_loss(m, batch), expect, atol=1e-5, rtol=1e-5)


def test_class_token_conditions_and_null_class_exists():
    m = model()
    x = tokens(1, 12).repeat(4, 1)
    with torch.no_grad():
        out = m(x, torch.tensor([0, 1, 2, 3]))
        assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[2], out[3])
        torch.testing.assert_close(m(x[:1], None), out[3:], atol=1e-6, rtol=0)  # None = the null class
        # the class slot's input value is ignored
        y = x.clone()
        y[:, 0] = 7
        torch.testing.assert_close(m(y, torch.tensor([0, 1, 2, 3])), out, atol=0, rtol=0)


def test_rope2d_is_relative_along_rows_and_columns():
    hd = 8
    coords = torch.tensor([[r, c] for r in range(5) for c in range(5)], dtype=torch.float32)
    cos, sin = rope2d_table(coords, hd)
    assert cos.shape == (26, hd // 2) and torch.equal(cos[-1], torch.ones(hd // 2))  # no position = identity
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, hd, generator=g), torch.randn(1, 1, 1, hd, generator=g)

    def score(pq, pk):
        a = apply_rope(q, cos[pq].view(1, 1, 1, -1), sin[pq].view(1, 1, 1, -1))
        b = apply_rope(k, cos[pk].view(1, 1, 1, -1), sin[pk].view(1, 1, 1, -1))
        return (a * b).sum().item()

    idx = lambda r, c: r * 5 + c
    assert math.isclose(score(idx(0, 0), idx(1, 2)), score(idx(2, 1), idx(3, 3)), rel_tol=1e-4, abs_tol=1e-5)
    assert not math.isclose(score(idx(0, 0), idx(1, 2)), score(idx(0, 0), idx(2, 1)), rel_tol=1e-3)
    x = torch.randn(2, 3, 4, hd, generator=g)
    rot = apply_rope(x, cos[:4].view(1, 1, 4, -1), sin[:4].view(1, 1, 4, -1))
    torch.testing.assert_close(rot.norm(dim=-1), x.norm(dim=-1))
    with pytest.raises(tokenloom.ConfigError, match="divisible by 4"):
        rope2d_table(coords, 6)


def test_layout_coordinates_cover_scales_and_depth():
    lay = tokenloom.TokenLayout(scales=((1, 1), (2, 2)), depth=2)
    c = layout_coordinates(lay)
    assert c.shape == (10, 4)
    torch.testing.assert_close(c[0], torch.tensor([0.5, 0.5, 0.0, 0.0]))  # 1×1 scale: the centre of 2×2
    torch.testing.assert_close(c[1], torch.tensor([0.5, 0.5, 0.0, 1.0]))  # depth-minor
    torch.testing.assert_close(c[2:4, :2], torch.zeros(2, 2))
    assert c[2:, 2].eq(1).all()
    m = build_model(spec(layout=lay, seq_len=11), ModelConfig(n_layer=1, d_model=16, n_head=2), n_classes=2)
    assert m.scale_emb is not None and m.depth_emb is not None
    with torch.no_grad():
        assert m(tokens(2, 11)).shape == (2, 11, 9)


def test_target_aware_positions_change_the_prediction():
    m = model(extra=(("target_aware", True),))
    x = tokens(1, 12)
    with torch.no_grad():
        a = m(x, target_positions=torch.arange(12))
        b = m(x, target_positions=torch.arange(12).flip(0))
    assert not torch.allclose(a, b)
    with pytest.raises(tokenloom.InputError, match="target_positions"):
        m(x)
    with pytest.raises(tokenloom.InputError, match="no target-aware positions"):
        model()(x, target_positions=torch.arange(12))  # refused, not silently ignored


def test_instrumented_wrapper_counts_passes_tokens_and_cache():
    w = InstrumentedModel(model())
    cache = w.new_cache(3)
    assert isinstance(cache, KVCache) and w.kv_cache_bytes == cache.nbytes == 2 * 2 * 3 * 4 * 12 * 8 * 4
    w(tokens(3, 1), None, cache=cache)
    w(tokens(3, 2), None, cache=cache, positions=torch.tensor([0, 1]))
    assert w.nfe == 2 and w.tokens == 9 and w.seconds > 0
    assert w.null_class == 3 and w.token_embeddings().shape == (10, 32)
    w.reset()
    assert w.counters() == {"nfe": 0, "tokens": 0, "seconds": 0.0, "kv_cache_bytes": 0}


def test_bad_inputs_are_clear_errors():
    m = model()
    with pytest.raises(tokenloom.InputError, match="ids"):
        m(torch.full((1, 4), 10))
    with pytest.raises(tokenloom.InputError, match="positions"):
        m(tokens(1, 4), positions=torch.tensor([-1, 0, 1, 40]))
    with pytest.raises(tokenloom.ConfigError):
        build_model(spec(attention="diagonal"), ModelConfig(n_layer=1, d_model=16, n_head=2), n_classes=2)


def test_flops_per_token_formula_and_seeded_init():
    m = model()
    n = m.n_params()
    assert m.flops_per_token(12) == 6 * n + 12 * 2 * 32 * 12
    assert n < sum(p.numel() for p in m.parameters())  # embeddings excluded
    a, b, c = model(seed=3), model(seed=3), model(seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.blocks[0].attn.qkv.weight, c.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("depth, depth_layers", [(1, 0), (4, 1), (4, 2)])
def test_flops_per_token_matches_torch_flop_counter(depth, depth_layers):
    """The trainer's FLOP count against torch's own count of one forward and
    backward pass: within the formula's approximation (attention over T, no
    softmax or norms) for a plain model and for a depth-head model, whose
    depth layers run once per code of every stack (counted once, a D = 4
    depth head was 1.8–2.3× under)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ModelConfig(n_layer=2, d_model=32, n_head=4)
    B, V = 4, 16
    if depth == 1:
        lay = tokenloom.TokenLayout(scales=((4, 4),))
        s = tokenloom.ModelSpec(seq_len=16, vocab_size=V, heads=(V,), train_order="t", layout=lay)
        x = torch.randint(0, V, (B, 16), generator=torch.Generator().manual_seed(0))
    else:
        lay = tokenloom.TokenLayout(scales=((4, 4),), depth=depth)
        s = tokenloom.ModelSpec(seq_len=17, vocab_size=V, heads=(V,) * depth, train_order="t", layout=lay,
                                extra=(("depth_head", depth_layers),))
        x = torch.randint(0, V, (B, 17, depth), generator=torch.Generator().manual_seed(0))
    m = build_model(s, cfg, n_classes=3).train()
    T = x.shape[1]
    with FlopCounterMode(display=False) as counter:
        out = m(x, torch.zeros(B, dtype=torch.long))
        sum(o.sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
    ratio = counter.get_total_flops() / (B * T * m.flops_per_token(T))
    assert 0.75 < ratio < 1.1, ratio


def test_old_public_path_keeps_the_moved_names():
    """``tokenloom.model`` re-exports what moved to the backbone's own rooms
    (the KV cache, the CPU kernels, the instrumented wrapper): the same
    objects, listed in its ``__all__``."""
    from tokenloom import model as public
    from tokenloom.backbone import instrumented, kernels, kvcache

    moved = {kvcache: ["KVCache"], instrumented: ["InstrumentedModel"],
             kernels: ["BMM_ATTENTION_PAIRS", "PLAIN_LINEAR", "CPULinear", "PlainLinear", "attend"]}
    for module, names in moved.items():
        assert set(names) <= set(module.__all__)  # a room may add names of its own (the static decoder)
        for name in names:
            assert getattr(public, name) is getattr(module, name) and name in public.__all__
    assert all(hasattr(public, name) for name in public.__all__)


def test_backbone_rooms_do_not_import_the_model():
    """The KV cache, the kernels and the instrumented wrapper import no
    ``tokenloom.model`` (which imports them): no import loop (a fresh
    interpreter, so nothing is imported already)."""
    import subprocess
    import sys

    code = ("import sys; import tokenloom.backbone.kvcache, tokenloom.backbone.kernels, "
            "tokenloom.backbone.instrumented; print('tokenloom.backbone.model' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_block_weights_are_named_after_the_block_parameters():
    """:class:`BlockWeights` names each of the twelve weights that
    :func:`block_forward` unpacks in field order after the parameter it is,
    and the functional block equals the module's own forward."""
    from tokenloom.model import BlockWeights, block_forward

    block = model().blocks[0]
    params = dict(block.named_parameters())
    weights = block.params()
    assert isinstance(weights, BlockWeights) and len(weights) == 12 == len(params)
    renamed = {"qkv": "attn.qkv", "attn_proj": "attn.proj", "fc": "mlp.fc", "mlp_proj": "mlp.proj"}
    for field, w in zip(BlockWeights._fields, weights):
        stem, kind = field.rsplit("_", 1)
        assert w is params[f"{renamed.get(stem, stem)}.{kind}"], field
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(block_forward(x, weights, 4, None, "causal", None, 0), block(x, None, "causal", None, 0))
