"""The performance pass changed how things are computed, never what: each
fast path here is checked against the straightforward formula it replaced."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenloom
from tokenloom.interfaces import check_logits
from tokenloom.model import apply_rope, rotate_pairs
from tokenloom.rng import RowRNG, _hash32, _hash32_int

_M32 = 0xFFFFFFFF


# -- counter-based RNG: the draws are the same bits as the reference formulas ---------------------------------


def _ref_mix(h: torch.Tensor, v: int) -> torch.Tensor:
    return _hash32(h ^ _hash32(torch.as_tensor(v, dtype=torch.int64) + 0x9E3779B9))


def _ref_uniform(rng: RowRNG, step: int, numel: int, stream: int) -> torch.Tensor:
    """RowRNG.uniform as first written: per-step mixes on tensors, float64 arithmetic."""
    key = _ref_mix(_ref_mix(rng._row_key, int(step) & _M32), int(stream) & _M32)
    ctr = torch.arange(numel, dtype=torch.int64)
    bits = _hash32(_hash32(key[:, None] ^ ctr[None, :]) + key[:, None]) >> 8
    return ((bits.to(torch.float64) + 0.5) / float(1 << 24)).to(torch.float32)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**40), rows=st.lists(st.integers(0, 2**34), min_size=1, max_size=5),
       steps=st.lists(st.integers(0, 2**33), min_size=1, max_size=4), stream=st.integers(0, 20),
       numel=st.integers(1, 300))
def test_row_rng_draws_equal_the_reference_formulas(seed, rows, steps, stream, numel):
    rng = RowRNG(seed, rows)
    for step in steps + steps[::-1]:  # repeated steps come from the cached key blocks
        ref = _ref_uniform(rng, step, numel, stream)
        assert torch.equal(rng.uniform(step, numel, stream=stream), ref)
        assert torch.equal(rng.gumbel(step, numel, stream=stream), (-torch.log(-torch.log(ref.double()))).float())


@given(x=st.integers(0, 2**40))
def test_scalar_hash_equals_the_tensor_hash(x):
    assert _hash32_int(x) == int(_hash32(torch.tensor(x, dtype=torch.int64)))


def test_float32_uniforms_equal_the_float64_rounding_for_every_24_bit_value():
    k = torch.arange(1 << 24, dtype=torch.int64)
    f64 = ((k.to(torch.float64) + 0.5) / float(1 << 24)).to(torch.float32)
    f32 = (k.to(torch.float32) + 0.5) / float(1 << 24)
    assert torch.equal(f32, f64)


# -- RoPE as a complex multiply ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3, 5, 8), (1, 1, 1, 4), (4, 7, 2, 3, 16)])
def test_rotate_pairs_equals_the_real_rotation(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    theta = torch.randn(*shape[:-1], shape[-1] // 2, generator=g)
    cos, sin = theta.cos(), theta.sin()
    a, b = x[..., 0::2], x[..., 1::2]
    ref = torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)
    torch.testing.assert_close(apply_rope(x, cos, sin), ref, atol=1e-6, rtol=0)
    # a strided view (q and k out of a fused qkv projection) gives the same numbers as a copy
    qkv = torch.randn(2, 5, 3, 4, 8, generator=g)
    cis = torch.polar(torch.ones(5, 1, 1, 4), torch.randn(5, 1, 1, 4, generator=g))
    assert torch.equal(rotate_pairs(qkv[:, :, :2], cis), rotate_pairs(qkv[:, :, :2].contiguous(), cis))


def test_rope_keeps_bf16_inputs_in_bf16():
    x = torch.randn(2, 3, 4, 8).bfloat16()
    theta = torch.randn(3, 1, 4)
    out = apply_rope(x, theta.cos(), theta.sin())
    assert out.dtype == torch.bfloat16 and out.shape == x.shape


# -- the logits check's fast path still refuses every bad row -----------------------------------------------


@pytest.mark.parametrize("value,message", [(float("nan"), "NaN"), (float("inf"), r"\+inf")])
def test_check_logits_refuses_nan_and_positive_infinity(value, message):
    logits = torch.randn(3, 700)
    logits[1, 650] = value
    with pytest.raises(tokenloom.InputError, match=message):
        check_logits(logits)


def test_check_logits_refuses_dead_rows_and_accepts_filtered_ones():
    logits = torch.randn(3, 9)
    logits[0, 2:] = float("-inf")  # filtered, still samplable
    check_logits(logits)
    logits[2] = float("-inf")
    with pytest.raises(tokenloom.InputError, match=r"rows \[2\]"):
        check_logits(logits)


# -- LFQ code ids from the layer's per-group ids ---------------------------------------------------------------


@pytest.mark.parametrize("config", [{"bits": 6, "entropy_groups": 2}, {"bits": 6, "entropy_groups": 1},
                                    {"bits": 6, "entropy_groups": 3, "spherical": True}])
def test_lfq_codes_equal_the_sign_pattern_of_the_quantised_vectors(config):
    tok = tokenloom.create("tokenizer", "lfq", image_shape=(3, 8, 8), downsample=2, **config)
    for mode in (tok.eval, tok.train):
        mode()
        z = torch.randn(3, 6, 4, 4, generator=torch.Generator().manual_seed(0))
        z[0, :, 0, 0] = 0.0  # sign(0) is a 0 bit in both
        q = tok.quantize(z)
        assert torch.equal(q.codes, tok.vectors_to_codes(q.latent.detach().permute(0, 2, 3, 1)).reshape(3, -1))


# -- tokenizers run their networks in fixed chunks: no image depends on its neighbours or position -------------


@pytest.mark.parametrize("name", ["vq", "fsq"])
def test_chunked_encode_decode_do_not_depend_on_position_or_neighbours(name):
    from tokenloom.testing import random_images

    tok = tokenloom.create("tokenizer", name, image_shape=(3, 16, 16), downsample=4).eval()
    x = random_images(21, (3, 16, 16), seed=3)  # a partial last chunk
    with torch.no_grad():
        codes = tok.encode(x)
        pixels = tok.decode(codes)
        for shift in (1, 5):  # every image at another position of its chunk, among other neighbours
            assert torch.equal(torch.roll(tok.encode(torch.roll(x, shift, 0)), -shift, 0), codes)
            assert torch.equal(torch.roll(tok.decode(torch.roll(codes, shift, 0)), -shift, 0), pixels)
        assert torch.equal(tok.encode(x[7:8]), codes[7:8]) and torch.equal(tok.decode(codes[20:]), pixels[20:])


# -- oneDNN prepacked linears for inference on the CPU -----------------------------------------------------------

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@needs_onednn
@settings(max_examples=20, deadline=None, derandomize=True)
@given(rows=st.integers(1, 40), d_in=st.sampled_from([8, 32, 96]), d_out=st.sampled_from([4, 64, 130]),
       bias=st.booleans(), lead=st.sampled_from([(), (2,), (1, 3)]))
def test_cpu_linear_equals_f_linear(rows, d_in, d_out, bias, lead):
    from tokenloom.backbone.kernels import PLAIN_LINEAR, CPULinear

    g = torch.Generator().manual_seed(rows * d_in + d_out)
    w, b = torch.randn(d_out, d_in, generator=g), (torch.randn(d_out, generator=g) if bias else None)
    x = torch.randn(*lead, rows, d_in, generator=g)
    strided = torch.randn(*lead, d_in, rows, generator=g).transpose(-1, -2)  # not contiguous
    other = torch.randn(*lead, rows, d_out, generator=g)
    lin, plain = CPULinear(), PLAIN_LINEAR
    with torch.no_grad():
        for inp in (x, strided):
            torch.testing.assert_close(lin(inp, w, b), torch.nn.functional.linear(inp, w, b), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lin.gelu_tanh(inp, w, b), plain.gelu_tanh(inp, w, b), atol=1e-5, rtol=1e-5)
            # the fused residual addition is the separate addition, bit for bit
            assert torch.equal(lin.add(inp, w, b, other), other + lin(inp, w, b))


@needs_onednn
def test_cpu_linear_rows_do_not_depend_on_their_batch():
    """The reason beyond speed: a row's output is the same bits whatever
    rows share the call (MKL's is not, below 16 rows)."""
    from tokenloom.backbone.kernels import CPULinear

    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(96, 64, generator=g), torch.randn(96, generator=g), torch.randn(48, 64, generator=g)
    lin = CPULinear()
    with torch.no_grad():
        together = lin(x, w, b)
        for m in (2, 3, 5, 16):
            assert torch.equal(torch.cat([lin(x[i : i + m], w, b) for i in range(0, 48, m)]), together)


@needs_onednn
def test_cpu_linear_repacks_after_the_weight_changes():
    from tokenloom.backbone.kernels import CPULinear

    lin, w, x = CPULinear(), torch.nn.Parameter(torch.randn(8, 4)), torch.randn(5, 4)
    with torch.no_grad():
        before = lin(x, w)
    w.grad = torch.ones_like(w)
    torch.optim.SGD([w], lr=1.0).step()  # in place: the version counter moves
    with torch.no_grad():
        assert torch.allclose(lin(x, w), torch.nn.functional.linear(x, w), atol=1e-5)
        assert not torch.allclose(lin(x, w), before)
        w.data = torch.zeros(8, 4)  # new storage, same version counter
        assert torch.equal(lin(x, w), torch.zeros(5, 8))


def test_cpu_linear_can_be_turned_off(monkeypatch):
    from tokenloom.backbone.kernels import CPULinear

    monkeypatch.setenv("TOKENLOOM_ONEDNN", "0")
    lin = CPULinear()
    assert not lin.enabled
    x, w = torch.randn(5, 4), torch.randn(8, 4)
    assert torch.equal(lin(x, w), torch.nn.functional.linear(x, w))


@needs_onednn
def test_generation_does_not_depend_on_the_batch_it_shares():
    """With oneDNN's batch-invariant linears an image's codes are the same
    bits in any batch of at least two rows."""
    from tokenloom.backbone.instrumented import InstrumentedModel
    from tokenloom.config import ModelConfig
    from tokenloom.model import build_model
    from tokenloom.sampling import SamplerChain

    tok = tokenloom.create("tokenizer", "pixel", bits=2, image_shape=(3, 6, 6))
    gen = tokenloom.create("generator", "raster", tokenizer=tok)
    model = InstrumentedModel(build_model(gen.model_spec(), ModelConfig(n_layer=2, d_model=32, n_head=2),
                                          n_classes=3).eval())
    cond = torch.arange(12) % 3
    with torch.inference_mode():
        together = gen.generate(model, SamplerChain(), cond, rng=RowRNG(4, torch.arange(12)))
        for size in (2, 5):
            parts = [gen.generate(model, SamplerChain(), cond[i : i + size], rng=RowRNG(4, torch.arange(i, min(12, i + size))))
                     for i in range(0, 12, size)]
            assert torch.equal(torch.cat(parts), together)


@pytest.mark.parametrize("pos", ["rope2d", "learned"])
def test_inference_forward_equals_the_autograd_forward(pos):
    """Without autograd the backbone rotates q/k in place and runs its
    linears through oneDNN; the logits are those of the training path."""
    from tokenloom.config import ModelConfig
    from tokenloom.interfaces import ModelSpec, TokenLayout
    from tokenloom.model import build_model

    spec = ModelSpec(vocab_size=10, seq_len=16, heads=(10,), train_order="t", layout=TokenLayout(scales=((4, 4),)))
    m = build_model(spec, ModelConfig(n_layer=2, d_model=32, n_head=2, pos=pos), n_classes=3).eval()
    x, cond = torch.randint(0, 10, (5, 16), generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3, 0])
    with torch.enable_grad():
        ref = m(x, cond)
    assert ref.requires_grad
    with torch.inference_mode():
        fast = m(x, cond)
    torch.testing.assert_close(fast, ref.detach(), atol=1e-5, rtol=1e-5)


def test_a_model_with_packed_weights_can_be_saved_whole(tmp_path):
    from tokenloom.config import ModelConfig
    from tokenloom.interfaces import ModelSpec
    from tokenloom.model import build_model

    spec = ModelSpec(vocab_size=10, seq_len=8, heads=(10,), train_order="t")
    m = build_model(spec, ModelConfig(n_layer=1, d_model=16, n_head=2), n_classes=2).eval()
    x = torch.randint(0, 10, (3, 8))
    with torch.inference_mode():
        want = m(x)  # packs the weights
    torch.save(m, tmp_path / "m.pt")
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.inference_mode():
        assert torch.equal(again(x), want)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(rows=st.integers(1, 40), heads=st.sampled_from([1, 2, 4]), keys=st.integers(1, 50), hd=st.sampled_from([8, 32]))
def test_attend_equals_sdpa(rows, heads, keys, hd):
    """The batched one-query path (from BMM_ATTENTION_PAIRS row×head pairs)
    and SDPA compute the same attention, on cache-like strided keys."""
    from tokenloom.backbone.kernels import attend

    g = torch.Generator().manual_seed(rows * 100 + keys)
    q = torch.randn(rows, 1, heads, hd, generator=g).transpose(1, 2)  # (B, H, 1, hd), strided like the decoder's
    cache_k, cache_v = torch.randn(2, rows, heads, keys + 7, hd, generator=g)
    k, v = cache_k.narrow(2, 0, keys), cache_v.narrow(2, 0, keys)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with torch.no_grad():
        torch.testing.assert_close(attend(q, k, v, None), ref, atol=1e-6, rtol=1e-5)


def test_pipeline_images_do_not_depend_on_how_many_are_generated():
    """Every micro-batch is filled to MICRO_BATCH rows, so image i is the
    same bits for any n (here the decoder's batched attention path is on:
    16 rows × 4 heads)."""
    from tokenloom.backbone.instrumented import InstrumentedModel
    from tokenloom.backbone.kernels import BMM_ATTENTION_PAIRS
    from tokenloom.config import ModelConfig
    from tokenloom.model import build_model
    from tokenloom.pipeline import MICRO_BATCH, generate_codes
    from tokenloom.sampling import SamplerChain

    assert MICRO_BATCH * 4 >= BMM_ATTENTION_PAIRS
    tok = tokenloom.create("tokenizer", "pixel", bits=2, image_shape=(3, 4, 4))
    gen = tokenloom.create("generator", "raster", tokenizer=tok)
    model = InstrumentedModel(build_model(gen.model_spec(), ModelConfig(n_layer=1, d_model=32, n_head=4),
                                          n_classes=3, seed=1).eval())
    rows = []

    class Spy:  # the generator, recording how many rows each micro-batch has
        def generate(self, *args, **kw):
            rows.append(args[2].shape[0])
            return gen.generate(*args, **kw)

    runs = {n: generate_codes(Spy(), model, SamplerChain(), torch.arange(n) % 3, seed=5, progress=False)[0]
            for n in (3, 19, 21)}
    assert rows == [MICRO_BATCH] * 5  # 1 + 2 + 2 micro-batches, every one full
    assert runs[19].shape == (19, 16)
    assert torch.equal(runs[3], runs[21][:3]) and torch.equal(runs[19], runs[21][:19])
