"""Deviations from the authors' reference code (issue 18, item 5): each test
pins a detail that is now kept from the reference (or the option that exposes
it, with the reference's value as documented), and would fail on the old
behaviour."""

from __future__ import annotations

import math

import pytest
import torch

import tokenloom
from tokenloom.plugins.generators.next_scale_markov import (
    REFERENCE_SPLITS,
    cosine_split,
    reference_split,
)
from tokenloom.rng import RowRNG
from tokenloom.sampling import SamplerChain, mass_ranked_from

# -- top-p / typical against Hugging Face transformers' warpers ---------------
# transformers is not installed: its formulas (generation/logits_process.py,
# TopPLogitsWarper and TypicalLogitsWarper, min_tokens_to_keep = 1) are written
# out here. transformers' generate() adds neither warper at p = 1.0.


def hf_top_p_keep(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return torch.isfinite(scores)
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative_probs <= (1 - top_p)
    remove[..., -1:] = False
    return ~remove.scatter(1, sorted_indices, remove)


def hf_typical_keep(scores: torch.Tensor, mass: float) -> torch.Tensor:
    if mass >= 1.0:
        return torch.isfinite(scores)
    normalized = torch.log_softmax(scores, dim=-1)
    p = torch.exp(normalized)
    ent = -(normalized * p).nansum(-1, keepdim=True)
    shifted = torch.abs((-normalized) - ent)
    sorted_scores, sorted_indices = torch.sort(shifted, descending=False)
    cumulative_probs = scores.gather(-1, sorted_indices).softmax(dim=-1).cumsum(dim=-1)
    last_ind = (cumulative_probs < mass).sum(dim=1).clamp(max=sorted_scores.shape[-1] - 1)
    remove = sorted_scores > sorted_scores.gather(1, last_ind.view(-1, 1))
    remove[..., :1] = False
    return ~remove.scatter(1, sorted_indices, remove)


def _random_logits(seed: int, rows: int = 16, V: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, V, generator=g, dtype=torch.float64) * torch.linspace(0.5, 6.0, rows)[:, None].double()


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0])
def test_top_p_is_transformers_top_p_warper(p):
    logits = _random_logits(1)
    kept = torch.isfinite(tokenloom.create("sampler", "top-p", p=p)(logits))
    assert torch.equal(kept, hf_top_p_keep(logits, p))


@pytest.mark.parametrize("mass", [0.05, 0.3, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0])
def test_typical_is_transformers_typical_warper(mass):
    logits = _random_logits(2)
    kept = torch.isfinite(tokenloom.create("sampler", "typical", mass=mass)(logits))
    assert torch.equal(kept, hf_typical_keep(logits, mass))


def test_top_p_and_typical_at_one_keep_a_tail_whose_preceding_mass_rounds_to_one():
    # 1 + e^-40 == 1.0 in float64: the old rule "mass before j < p" dropped every entry but the first
    logits = torch.tensor([[0.0, -40.0, -41.0, -42.0, -43.0]], dtype=torch.float64)
    probs = torch.softmax(logits, -1)
    assert float(probs[0, 0]) == 1.0  # the rounding the old rule tripped on
    assert torch.isfinite(tokenloom.create("sampler", "top-p", p=1.0)(logits)).all()
    assert torch.isfinite(tokenloom.create("sampler", "typical", mass=1.0)(logits)).all()


def test_mass_ranked_from_counts_ties_and_sums_the_tail_first():
    probs = torch.tensor([[0.4, 0.2, 0.2, 0.1, 0.1]], dtype=torch.float64)
    got = mass_ranked_from(probs, -probs)
    assert torch.allclose(got, torch.tensor([[1.0, 0.6, 0.6, 0.2, 0.2]], dtype=torch.float64))
    tiny = torch.tensor([[1.0, 1e-30, 1e-30]], dtype=torch.float64)
    assert float(mass_ranked_from(tiny, -tiny)[0, 1]) == 2e-30


# -- RAR: the reference's annealing window ------------------------------------


def tok(gh: int = 3, gw: int = 4, bits: int = 1):
    return tokenloom.create("tokenizer", "pixel", bits=bits, pool=2, image_shape=(3, 2 * gh, 2 * gw))


def test_rar_defaults_anneal_between_half_and_three_quarters_of_training():
    gen = tokenloom.create("generator", "raster", tokenizer=tok(), rar=True)
    assert (gen.config.rar_start, gen.config.rar_end) == (0.5, 0.75)  # rar.yaml: 125k, 187.5k of 250k
    expected = {0.0: 1.0, 0.25: 1.0, 0.5: 1.0, 0.625: 0.5, 0.75: 0.0, 0.9: 0.0}
    for progress, r in expected.items():
        gen.on_train_step(round(progress * 1000), 1000)
        assert math.isclose(gen.permute_probability(), r), progress


# -- HMAR: the released schedule, re-masking without noise, the mask head ------


def test_hmar_reference_schedule_is_the_released_mask_schedule():
    # NVlabs/HMAR utils/sampling_arg_util.py on VAR's scales 1, 2, 3, 4, 5, 6, 8, 10, 13, 16
    released = [[1], [1, 3], [1, 1, 2, 5], [16], [25], [36], [64], [100], [169], [256]]
    ours = [reference_split(pn * pn, REFERENCE_SPLITS[k]) if k in REFERENCE_SPLITS else [pn * pn]
            for k, pn in enumerate((1, 2, 3, 4, 5, 6, 8, 10, 13, 16))]
    assert ours == released


def ms_tok():
    return tokenloom.create("tokenizer", "multiscale")


def test_hmar_default_refines_two_scales_and_steps_restores_the_cosine_schedule():
    t = ms_tok()
    sizes = [h * w for h, w in t.layout.scales]
    gen = tokenloom.create("generator", "next-scale-markov", tokenizer=t)
    assert gen.schedule == [[1], [1, 3], [1, 1, 2, 5]] + [[n] for n in sizes[3:]]
    assert gen.expected_nfe() == len(sizes) + 4  # was Σ min(4, n_k) = 21 on this tokenizer
    old = tokenloom.create("generator", "next-scale-markov", tokenizer=t, steps=4)
    assert old.expected_nfe() == sum(min(4, n) for n in sizes)
    assert old.schedule == [cosine_split(n, 4) for n in sizes]
    with pytest.raises(tokenloom.ConfigError, match="tokens_per_step"):
        tokenloom.create("generator", "next-scale-markov", tokenizer=t, tokens_per_step=[[1], [4]])


class _ScaleModel:
    """Logits that depend only on the position inside a scale (head 0) or
    favour code 1 everywhere (head 1); records the revealed flags it is fed."""

    device = torch.device("cpu")
    null_class = 0

    def __init__(self, V, two_heads, margin=0.05):
        self.V, self.two_heads, self.margin, self.fed = V, two_heads, margin, []

    def __call__(self, x, rows, *, positions, attn_mask):
        B, T, _ = x.shape
        self.fed.append(x[:, 1:, -1].clone())  # the revealed flag of every token
        ns = torch.zeros(B, T, self.V)
        ns[..., 0] = self.margin * torch.arange(T, dtype=torch.float32)  # the last token the most confident
        mask = torch.zeros(B, T, self.V)
        mask[..., 1] = 5.0
        return (ns, mask) if self.two_heads else ns


def _decode(gen, model, seed=0, B=16):
    chain = SamplerChain([tokenloom.create("sampler", "greedy")])
    return gen.generate(model, chain, torch.zeros(B, dtype=torch.long), rng=RowRNG(seed, list(range(B))))


def test_hmar_remasks_by_plain_probability_without_gumbel_noise():
    t = ms_tok()
    kept = {}
    for remask in ("probability", "gumbel"):
        gen = tokenloom.create("generator", "next-scale-markov", tokenizer=t, remask=remask, mask_head=False,
                               tokens_per_step=[[1], [1, 3], [9], [16], [36], [64]])
        model = _ScaleModel(t.vocab_size, two_heads=False, margin=0.01)
        _decode(gen, model)
        revealed = model.fed[2]  # scale 1's refinement pass: the token its first pass settled
        assert (revealed.sum(1) == 1).all()
        kept[remask] = revealed.argmax(1)
    # HMAR's code keeps the most probable sampled code: the scale's last token (the highest margin), every row
    assert (kept["probability"] == 3).all()
    assert kept["gumbel"].unique().numel() > 1  # MaskGIT's noise decides, row by row (the old behaviour)


def test_hmar_mask_head_is_a_second_head_used_by_the_refinement_passes():
    t = ms_tok()
    gen = tokenloom.create("generator", "next-scale-markov", tokenizer=t)
    assert gen.model_spec().heads == (t.vocab_size, t.vocab_size)
    assert tokenloom.create("generator", "next-scale-markov", tokenizer=t, mask_head=False).model_spec().heads == (
        t.vocab_size,)
    codes = _decode(gen, _ScaleModel(t.vocab_size, two_heads=True, margin=50.0))
    a = gen.offsets[1]
    # scale 1: one token settled by the next-scale head (code 0, the last position most confident),
    # three by the mask head (code 1)
    assert (codes[:, a : a + 4] == torch.tensor([1, 1, 1, 0])).all()
    assert (codes[:, gen.offsets[3]:gen.offsets[4]] == 0).all()  # one pass: the next-scale head only
    # training: even rows train head 0 on every token, odd rows head 1 on the hidden ones only
    torch.manual_seed(0)
    c = torch.randint(0, t.vocab_size, (4, gen.L))
    batch = gen.training_batch(c, torch.zeros(4))
    assert batch.targets.shape == (4, gen.L + 1, 2) and batch.loss_mask.shape == (4, gen.L + 1, 2)
    assert batch.loss_mask[0::2, 1:, 0].all() and not batch.loss_mask[0::2, :, 1].any()
    assert not batch.loss_mask[1::2, :, 0].any() and batch.loss_mask[1::2, 1:, 1].any()
    revealed = batch.inputs[1::2, 1:, -1] > 0
    assert not (batch.loss_mask[1::2, 1:, 1] & revealed).any()  # odd rows: loss only where hidden


# -- GSD: the reference's rank window, probability gap and distance rule -------


def _gsd(**kw):
    rule = tokenloom.create("sampler", "gsd", **kw)
    V = 32
    emb = torch.zeros(V, 4)
    emb[:, 0] = torch.arange(V) * 0.1  # squared distance between codes i and j: 0.01·(i − j)²
    rule.bind(tokenloom.SamplerContext(vocab_size=V, token_embeddings=emb))
    return rule, V


def test_gsd_defaults_are_the_reference_thresholds():
    cfg = tokenloom.create("sampler", "gsd").config
    assert (cfg.rank_window, cfg.rank_window_above, cfg.max_gap) == (7, None, 0.15)
    assert (cfg.distance, cfg.max_distance) == ("squared-l2", 0.5)


def test_gsd_window_is_seven_below_six_above_the_draft():
    rule, V = _gsd(max_distance=1e9)  # only the window decides
    p = torch.full((1, V), 1.0 / V, dtype=torch.float64)  # tiny gaps
    p[0] = torch.linspace(2.0, 1.0, V, dtype=torch.float64)  # strictly decreasing: rank = index
    p /= p.sum()
    g = rule.group(p, torch.tensor([15]))
    assert torch.equal(g[0].nonzero().flatten(), torch.arange(15 - 6, 15 + 8))  # [i − 6, i + 7]: 14 tokens


def test_gsd_gap_is_strict_and_distance_is_squared_l2_on_raw_embeddings():
    rule, V = _gsd(rank_window=31, rank_window_above=31, max_gap=0.125)
    p = torch.zeros(1, V, dtype=torch.float64)
    p[0, 10], p[0, 11], p[0, 12], p[0, 16] = 0.375, 0.25, 0.1875, 0.1875  # exact binary fractions
    g = rule.group(p, torch.tensor([11]))[0]
    # code 10: gap 0.125 is not < 0.125 (the reference's test is strict); code 12: gap 0.0625, squared
    # distance 0.01; code 16: gap 0.0625, squared distance 0.25 < 0.5
    assert g[11] and not g[10] and g[12] and g[16]
    far = p.clone()
    far[0, 16], far[0, 20] = 0.0, 0.1875
    g = rule.group(far, torch.tensor([12]))[0]
    assert g[11] and not g[20]  # code 20: gap 0 but squared distance 0.64 >= 0.5: not interchangeable
    cos = _gsd(rank_window=31, rank_window_above=31, distance="cosine")[0].group(far, torch.tensor([12]))[0]
    assert cos[20]  # every embedding points the same way: cosine similarity 1


# -- LlamaGen's VQ: the codebook l2-normalised at initialisation (an option) ---


def test_vq_l2_init_normalises_the_stored_codebook_as_llamagen():
    from tokenloom.quantize import VectorQuantizer

    torch.manual_seed(0)
    ours = VectorQuantizer(64, 8)
    torch.manual_seed(0)
    llamagen = VectorQuantizer(64, 8, l2_init=True)
    n = llamagen.embedding.weight.norm(dim=-1)
    assert torch.allclose(n, torch.ones_like(n))  # vq_model.py: F.normalize(self.embedding.weight.data)
    assert ours.embedding.weight.norm(dim=-1).max() < 1.0 / 64 * math.sqrt(8)  # uniform(±1/V): tiny raw norms
    assert torch.allclose(llamagen.codebook(), ours.codebook(), atol=1e-6)  # the same directions
    assert not VectorQuantizer(64, 8, l2_norm=False, l2_init=True).embedding.weight.norm(dim=-1).allclose(
        torch.ones(64))  # only with the normalised lookup, as LlamaGen
    tok = tokenloom.create("tokenizer", "vq", image_shape=(3, 16, 16), downsample=2, codebook_size=64, l2_init=True)
    assert torch.allclose(tok.quantizer.embedding.weight.norm(dim=-1), torch.ones(64))


# -- VAR's CFG convention --------------------------------------------------------


def test_cfg_var_convention_is_var_guidance_one_plus_t_ramped_over_scales():
    K, B, V = 6, 2, 5
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(B, V, generator=g, dtype=torch.float64), torch.randn(B, V, generator=g, dtype=torch.float64)
    var_cfg = 1.5
    ours = tokenloom.create("sampler", "cfg", scale=var_cfg, schedule="linear", convention="var")
    same = tokenloom.create("sampler", "cfg", scale=1 + var_cfg, schedule="linear")
    naive = tokenloom.create("sampler", "cfg", scale=var_cfg)  # copying VAR's number alone under-guides
    for si in range(K):
        info = tokenloom.StepInfo(step=si, n_steps=K, uncond_logits=u)
        t = var_cfg * si / (K - 1)
        var = (1 + t) * c - t * u  # models/var.py autoregressive_infer_cfg
        assert torch.allclose(ours(c, info), var) and torch.allclose(same(c, info), var)
    last = tokenloom.StepInfo(step=K - 1, n_steps=K, uncond_logits=u)
    assert not torch.allclose(naive(c, last), (1 + var_cfg) * c - var_cfg * u)
    assert tokenloom.create("sampler", "cfg").config.convention == "s"  # the default is unchanged


# -- RandAR: guidance ramps by the fraction of tokens decoded --------------------


class _ProgressLog(tokenloom.Sampler):
    """A step-dependent processor that records the progress each step is told."""

    def __init__(self):
        self.seen: list[tuple[int, float]] = []

    def depends_on_step(self) -> bool:
        return True

    def process(self, logits, info):
        k = 1 if info.positions is None or info.positions.dim() == 1 else info.positions.shape[1]
        self.seen.append((k, info.progress))
        return logits


def _randar(name, **kw):
    from tokenloom.config import ModelConfig
    from tokenloom.model import InstrumentedModel, build_model

    t = tok(2, 4)  # L = 8
    gen = tokenloom.create("generator", name, tokenizer=t, **kw)
    model = InstrumentedModel(build_model(gen.model_spec(), ModelConfig(n_layer=1, d_model=16, n_head=2),
                                          n_classes=3, seed=0).eval())
    log = _ProgressLog()
    with torch.no_grad():
        gen.generate(model, SamplerChain([log]), torch.tensor([0, 1]), rng=RowRNG(0, [0, 1]))
    return gen, log.seen


def test_random_parallel_progress_is_the_fraction_of_tokens_decoded_as_randar():
    gen, seen = _randar("random-parallel", steps=4)
    L, done = gen.L, 0
    for k, progress in seen:
        assert math.isclose(progress, done / L)  # randar_gpt.py: query_token_idx_cur_step / block_size
        done += k
    assert done == L and len(seen) == gen.expected_nfe() < L
    _, by_pass = _randar("random-parallel", steps=4, progress="pass")
    assert [p for _, p in by_pass] == [s / (len(by_pass) - 1) for s in range(len(by_pass))]  # the old ramp


def test_random_progress_is_t_over_L_as_randar():
    gen, seen = _randar("random")
    assert [p for _, p in seen] == [t / gen.L for t in range(gen.L)]
    _, by_pass = _randar("random", progress="pass")
    assert [p for _, p in by_pass] == [t / (gen.L - 1) for t in range(gen.L)]


# -- VAR: AdaLN conditioning and learned absolute + level positions ([model] options) --------


def _var_reference_logits(m, ids, cond, positions):
    """VAR's forward (models/var.py, basic_var.py AdaLNSelfAttn / AdaLNBeforeHead) written out
    for a one-layer tokenloom backbone's weights: cond_BD = the class embedding, every block
    x += γ₁·attn(LN(x)(1+s₁)+β₁), x += γ₂·ffn(LN(x)(1+s₂)+β₂), head(LN(x)(1+s)+β)."""
    import torch.nn.functional as F

    C, H = m.config.d_model, m.config.n_head
    cond_BD = m.cls_emb.weight[cond]  # (B, C)
    x = m.tok_emb.weight[ids].clone()
    x[:, 0] = cond_BD  # the start token
    x = x + m.pos_emb.weight[torch.where(positions < 0, m.n_pos, positions)]
    blk, lin = m.blocks[0], m.adaln.blocks[0]
    g1, g2, s1, s2, b1, b2 = lin(F.silu(cond_BD)).view(-1, 1, 6, C).unbind(2)
    B, T, _ = x.shape
    h = F.layer_norm(x, (C,)) * (1 + s1) + b1
    q, k, v = blk.attn.qkv(h).view(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
    x = x + blk.attn.proj(a) * g1
    h = F.layer_norm(x, (C,)) * (1 + s2) + b2
    x = x + blk.mlp.proj(F.gelu(blk.mlp.fc(h), approximate="tanh")) * g2
    s, b = m.adaln.head(F.silu(cond_BD)).view(-1, 1, 2, C).unbind(2)
    return m.heads[0](F.layer_norm(x, (C,)) * (1 + s) + b)


def _adaln_model(cond="adaln", pos="learned", n_layer=1, seed=0):
    from tokenloom.config import ModelConfig
    from tokenloom.model import build_model

    gen = tokenloom.create("generator", "raster", tokenizer=tok(3, 4))
    cfg = ModelConfig(n_layer=n_layer, d_model=32, n_head=4, pos=pos, cond=cond)
    return gen, build_model(gen.model_spec(), cfg, n_classes=3, seed=seed).eval()


def test_adaln_backbone_is_var_adaln_self_attn():
    _, m = _adaln_model()
    with torch.no_grad():
        for p in m.adaln.parameters():  # off the near-identity init, so every term matters
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    T = m.spec.seq_len
    ids = torch.randint(0, m.spec.vocab_size, (3, T), generator=torch.Generator().manual_seed(1))
    cond, positions = torch.tensor([0, 2, 3]), torch.arange(-1, T - 1)
    with torch.no_grad():
        ours = m(ids, cond, positions=positions)
        ref = _var_reference_logits(m, ids, cond, positions)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # the condition reaches every position through the blocks, not only through index 0's token
    with torch.no_grad():
        other = m(ids, torch.tensor([1, 2, 3]), positions=positions)
    assert (other[0] - ours[0]).abs().amax(-1).min() > 1e-4


def test_adaln_init_is_var_init_weights_and_layernorms_lose_affine_weights():
    _, m = _adaln_model(n_layer=2)
    C = m.config.d_model
    names = {n for n, _ in m.named_parameters()}
    assert not any(".ln_1." in n or ".ln_2." in n or n.startswith("ln_f.") for n in names)  # ln_wo_grad
    for lin in m.adaln.blocks:
        assert lin.weight[: 2 * C].abs().max() < 1e-5 * 0.2  # gates: × init_adaln_gamma = 1e-5
        assert 0.5 * 0.02 * 0.5 < lin.weight[2 * C:].std() < 0.5 * 0.02 * 2  # scale/shift: × 0.5
        assert not lin.bias.any()
    assert not m.adaln.head.bias.any()


def test_adaln_cached_decoding_equals_full_recomputation():
    _, m = _adaln_model(pos="rope2d", n_layer=2, seed=3)
    with torch.no_grad():
        for p in m.adaln.parameters():
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    T = m.spec.seq_len
    ids = torch.randint(0, m.spec.vocab_size, (2, T), generator=torch.Generator().manual_seed(2))
    cond = torch.tensor([1, 3])
    with torch.no_grad():
        full = m(ids, cond)
        cache = m.new_cache(2, T)
        inc = torch.cat([m(ids[:, s: s + 3], cond, cache=cache) for s in range(0, T, 3)], 1)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=0)


def test_adaln_with_a_prefix_of_several_positions_conditions_on_its_last_position():
    from tokenloom.config import ModelConfig
    from tokenloom.model import PrefixFormat, Transformer

    gen = tokenloom.create("generator", "raster", tokenizer=tok(2, 2))
    cfg = ModelConfig(n_layer=1, d_model=16, n_head=2, cond="adaln")
    m = Transformer(gen.model_spec(), cfg, n_classes=2, prefix=PrefixFormat("embeddings", 3, dim=5)).eval()
    g = torch.Generator().manual_seed(0)
    table = tokenloom.Prefix(mask=torch.ones(2, 3, dtype=torch.bool), embeddings=torch.randn(2, 3, 5, generator=g))
    null = tokenloom.Prefix(mask=torch.tensor([[False, False, True]]), embeddings=torch.zeros(1, 3, 5))
    m.set_conditions(table, null)
    seen = []
    m.adaln.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    ids = torch.zeros(3, gen.model_spec().seq_len, dtype=torch.long)
    with torch.no_grad():
        m(ids, torch.tensor([0, 1, 2]))
    expected = m._prefix(torch.tensor([0, 1, 2]))[0][:, -1]
    torch.testing.assert_close(seen[0], expected)


def test_adaln_counts_its_linears_once_per_sequence_and_keeps_default_keys():
    from tokenloom.config import ModelConfig

    _, m = _adaln_model(n_layer=2)
    _, plain = _adaln_model(cond="prefix", n_layer=2)
    T, d, n_ada = m.spec.seq_len, m.config.d_model, m.adaln.n_params()
    assert n_ada == 2 * (d * 6 * d + 6 * d) + d * 2 * d + 2 * d
    assert m.flops_per_token() == 6 * (m.n_params() - n_ada) + (6 * n_ada) // T + 12 * 2 * d * T
    assert m.n_params() == plain.n_params() + n_ada - (2 * 2 * 2 * d + 2 * d)  # LayerNorms lose their affine
    assert "cond" not in ModelConfig().key() and ModelConfig().key() == {
        k: v for k, v in __import__("attrs").asdict(ModelConfig()).items() if k != "cond"}
    assert ModelConfig(cond="adaln").key()["cond"] == "adaln"
    assert not any(n.startswith("adaln") for n in plain.state_dict())
    with pytest.raises(ValueError):
        ModelConfig(cond="film")


def test_learned_positions_on_a_multiscale_layout_are_var_pos_1lc_plus_lvl_embed():
    from tokenloom.config import ModelConfig
    from tokenloom.model import build_model

    gen = tokenloom.create("generator", "next-scale", tokenizer=ms_tok())
    spec = gen.model_spec()
    m = build_model(spec, ModelConfig(n_layer=1, d_model=16, n_head=2, pos="learned", cond="adaln"), n_classes=2)
    L = spec.layout.length
    level = torch.cat([torch.full((h * w,), k) for k, (h, w) in enumerate(spec.layout.scales)])
    x = torch.zeros(1, L, 16)
    got, rope = m._add_positions(x, torch.arange(L), None)
    assert rope is None
    torch.testing.assert_close(got[0], m.pos_emb.weight[:L] + m.scale_emb.weight[level])  # pos_1LC + lvl_embed


# -- NAR: the down head has its own block, norm and output layer ---------------------------


def _nar_model(down_blocks=1, n_layer=2, seed=0):
    from tokenloom.config import ModelConfig
    from tokenloom.model import build_model

    gen = tokenloom.create("generator", "neighboring", tokenizer=tok(3, 4), down_blocks=down_blocks)
    cfg = ModelConfig(n_layer=n_layer, d_model=32, n_head=4, pos="learned")
    return gen, build_model(gen.model_spec(), cfg, n_classes=3, seed=seed).eval()


def test_nar_down_head_reads_its_own_block_norm_and_output_as_the_reference():
    import torch.nn.functional as F

    gen, m = _nar_model()
    assert gen.model_spec().option("head_blocks") == (0, 1)  # medusa_attention_num = 1
    assert len(m.blocks) == 3 and len(m.head_lns) == 1
    codes = torch.randint(0, gen.V, (2, gen.L), generator=torch.Generator().manual_seed(0))
    batch = gen.training_batch(codes, torch.tensor([0, 1]))
    with torch.no_grad():
        right, down = m(batch.inputs, batch.cond, positions=batch.positions, attn_mask=batch.attn_mask)
        # gpt.py Transformer.forward: layers 0..n_layer-1 -> h (norm, output); one more -> medusa_h
        x = m._embed(batch.inputs, batch.cond, 0, None)
        x, _ = m._add_positions(x, batch.positions, None)
        for b in m.blocks[:2]:
            x = b(x, None, batch.attn_mask, None, 0)
        medusa = m.blocks[2](x, None, batch.attn_mask, None, 0)
        ref_right = m.heads[0](F.layer_norm(x, (32,), m.ln_f.weight, m.ln_f.bias))
        ref_down = m.heads[1](m.head_lns[0](medusa))
    torch.testing.assert_close(right, ref_right, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(down, ref_down, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(down, m.heads[1](F.layer_norm(x, (32,), m.ln_f.weight, m.ln_f.bias)), atol=1e-3)


def test_nar_down_blocks_zero_is_the_old_two_linear_heads_and_generation_runs_cached():
    from tokenloom.model import InstrumentedModel

    old, m0 = _nar_model(down_blocks=0)
    assert old.model_spec().extra == () and m0.head_blocks is None and len(m0.blocks) == 2
    gen, m = _nar_model()
    model = InstrumentedModel(m)
    with torch.no_grad():
        codes = gen.generate(model, SamplerChain([]), torch.tensor([0, 2]), rng=RowRNG(0, [0, 1]))
    assert codes.shape == (2, gen.L) and model.nfe == gen.expected_nfe()
    T, d = m.spec.seq_len, 32
    assert m.flops_per_token() == 6 * m.n_params() + 12 * 3 * d * T  # the extra block's attention counted


def test_head_blocks_keep_cached_decoding_equal_to_recomputation():
    from tokenloom.config import ModelConfig
    from tokenloom.model import build_model

    spec = tokenloom.ModelSpec(seq_len=9, vocab_size=7, heads=(7, 5, 6), train_order="t",
                               extra=(("head_blocks", (0, 2, 1)),))
    for cond in ("prefix", "adaln"):
        m = build_model(spec, ModelConfig(n_layer=1, d_model=16, n_head=2, cond=cond), n_classes=2, seed=1).eval()
        ids = torch.randint(0, 7, (2, 9), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            full = m(ids, torch.tensor([0, 2]))
            cache = m.new_cache(2, 9)
            parts = [m(ids[:, s: s + 4], torch.tensor([0, 2]), cache=cache) for s in range(0, 9, 4)]
        for k in range(3):
            torch.testing.assert_close(torch.cat([p[k] for p in parts], 1), full[k], atol=1e-5, rtol=0)
    bad = tokenloom.ModelSpec(seq_len=9, vocab_size=7, heads=(7, 5), train_order="t", extra=(("head_blocks", (0,)),))
    with pytest.raises(tokenloom.ConfigError, match="head_blocks"):
        build_model(bad, ModelConfig(n_layer=1, d_model=16, n_head=2), n_classes=2)


# -- RandAR: the position instruction's embedding rotated by its target position ------------


def test_randar_rotate_instruction_rotates_the_instruction_embedding_as_the_reference():
    from tokenloom.backbone.positions import rotate_inputs
    from tokenloom.config import ModelConfig
    from tokenloom.model import build_model

    t = tok(2, 4)
    gen = tokenloom.create("generator", "random", tokenizer=t, rotate_instruction=True)
    plain = tokenloom.create("generator", "random", tokenizer=t)
    assert gen.model_spec().option("rotate_ids") == (gen.V,) and plain.model_spec().extra == ()
    par = tokenloom.create("generator", "random-parallel", tokenizer=t, rotate_instruction=True)
    assert par.model_spec() == gen.model_spec()  # still one shared model
    cfg = ModelConfig(n_layer=1, d_model=16, n_head=2)
    m = build_model(gen.model_spec(), cfg, n_classes=2, seed=0).eval()
    order = torch.stack([torch.randperm(gen.L, generator=torch.Generator().manual_seed(s)) for s in (0, 1)])
    batch = gen.sequence(torch.randint(0, gen.V, (2, gen.L)), order)
    ids = batch.inputs
    x = m.tok_emb.weight[ids]
    got, rope = m._add_positions(x, batch.positions, None)
    got = rotate_inputs(got, ids, rope, m.rotate_ids, 2)
    # randar_gpt.py batch_apply_rotary_emb on pos_instruct_embeddings viewed [n_head, head_dim]
    e = m.tok_emb.weight[gen.V].view(2, 8)  # (n_head, head_dim)
    for b in range(2):
        for t_ in range(1, ids.shape[1], 2):  # the instruction slots
            cis = m.rope_cis[batch.positions[b, t_]]  # (hd/2,) complex
            pairs = e.reshape(2, 4, 2)
            ref = torch.stack([pairs[..., 0] * cis.real - pairs[..., 1] * cis.imag,
                               pairs[..., 1] * cis.real + pairs[..., 0] * cis.imag], -1).flatten()
            torch.testing.assert_close(got[b, t_], ref)
        torch.testing.assert_close(got[b, 2::2], x[b, 2::2])  # image tokens are not rotated
    # the model's forward does it, and cached decoding still runs
    from tokenloom.model import InstrumentedModel

    with torch.no_grad():
        codes = gen.generate(InstrumentedModel(m), SamplerChain([]), torch.tensor([0, 1]), rng=RowRNG(0, [0, 1]))
    assert codes.shape == (2, gen.L)
    with pytest.raises(tokenloom.ConfigError, match="rope2d"):
        build_model(gen.model_spec(), ModelConfig(n_layer=1, d_model=16, n_head=2, pos="learned"), n_classes=2)


def test_randar_rotation_changes_the_forward_only_at_instructions():
    from tokenloom.config import ModelConfig
    from tokenloom.model import build_model

    t = tok(2, 4)
    on = tokenloom.create("generator", "random", tokenizer=t, rotate_instruction=True)
    off = tokenloom.create("generator", "random", tokenizer=t)
    cfg = ModelConfig(n_layer=1, d_model=16, n_head=2)
    m_on = build_model(on.model_spec(), cfg, n_classes=2, seed=0).eval()
    m_off = build_model(off.model_spec(), cfg, n_classes=2, seed=0).eval()
    m_on.load_state_dict(m_off.state_dict())  # the same weights: only the rotation differs
    order = torch.arange(on.L).expand(1, -1)
    batch = on.sequence(torch.randint(0, on.V, (1, on.L), generator=torch.Generator().manual_seed(0)), order)
    with torch.no_grad():
        a = m_on(batch.inputs, torch.tensor([0]), positions=batch.positions)
        b = m_off(batch.inputs, torch.tensor([0]), positions=batch.positions)
    torch.testing.assert_close(a[:, :2], b[:, :2])  # cls, and the first instruction at position 0 (no rotation)
    assert not torch.allclose(a[:, 3], b[:, 3])  # the instruction for position 1 carries its rotation


# -- HMAR: the mask path's own blocks, norm and output layer --------------------------------


def test_hmar_mask_path_has_its_own_copy_of_the_last_blocks_as_the_reference():
    import torch.nn.functional as F

    from tokenloom.config import ModelConfig
    from tokenloom.model import build_model

    t = ms_tok()
    gen = tokenloom.create("generator", "next-scale-markov", tokenizer=t)
    assert gen.model_spec().option("head_branch") == (0, 0.5)
    assert tokenloom.create("generator", "next-scale-markov", tokenizer=t, mask_blocks=0).model_spec().extra == ()
    m = build_model(gen.model_spec(), ModelConfig(n_layer=4, d_model=32, n_head=4), n_classes=2).eval()
    # hmar.py: base_blocks (depth - n_layers_train), then ns_blocks / mask_blocks (n_layers_train each)
    assert len(m.blocks) == 4 and [len(b) for b in m.branch_blocks] == [0, 2] and len(m.head_lns) == 1
    c = torch.randint(0, t.vocab_size, (2, gen.L), generator=torch.Generator().manual_seed(0))
    batch = gen.training_batch(c, torch.tensor([0, 1]))
    with torch.no_grad():
        ns, mask = m(batch.inputs, batch.cond, positions=batch.positions, attn_mask=batch.attn_mask)
        x = m._embed(batch.inputs, batch.cond, 0, None)
        x, rope = m._add_positions(x, batch.positions, None)
        for b in m.blocks[:2]:
            x = b(x, rope, batch.attn_mask, None, 0)
        base = x
        for b in m.blocks[2:]:  # ns_blocks
            x = b(x, rope, batch.attn_mask, None, 0)
        h = base
        for b in m.branch_blocks[1]:  # mask_blocks, from the base blocks' output
            h = b(h, rope, batch.attn_mask, None, 0)
        ref_ns = m.heads[0](F.layer_norm(x, (32,), m.ln_f.weight, m.ln_f.bias))
        ref_mask = m.heads[1](m.head_lns[0](h))  # mask_head_nm, mask_head
    torch.testing.assert_close(ns, ref_ns, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mask, ref_mask, atol=1e-5, rtol=1e-5)
    T, d = m.spec.seq_len, 32
    assert m.flops_per_token() == 6 * m.n_params() + 12 * 6 * d * T  # 4 stack blocks + 2 of the mask path's
    n_shared = build_model(tokenloom.create("generator", "next-scale-markov", tokenizer=t, mask_blocks=0)
                           .model_spec(), ModelConfig(n_layer=4, d_model=32, n_head=4), n_classes=2).n_params()
    per_block = sum(p.numel() for p in m.blocks[0].parameters())
    assert m.n_params() == n_shared + 2 * per_block + 2 * d  # two copied blocks and the mask path's norm


def test_head_branch_keeps_cached_decoding_equal_and_rejects_bad_counts():
    from tokenloom.config import ModelConfig
    from tokenloom.model import build_model

    spec = tokenloom.ModelSpec(seq_len=9, vocab_size=7, heads=(7, 5, 6), train_order="t",
                               extra=(("head_branch", (0, 1, 2)),))
    for cond in ("prefix", "adaln"):
        m = build_model(spec, ModelConfig(n_layer=2, d_model=16, n_head=2, cond=cond), n_classes=2, seed=1).eval()
        assert m.n_block_layers == 5
        ids = torch.randint(0, 7, (2, 9), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            full = m(ids, torch.tensor([0, 2]))
            cache = m.new_cache(2, 9)
            parts = [m(ids[:, s: s + 4], torch.tensor([0, 2]), cache=cache) for s in range(0, 9, 4)]
        for k in range(3):
            torch.testing.assert_close(torch.cat([p[k] for p in parts], 1), full[k], atol=1e-5, rtol=0)
    cfg = ModelConfig(n_layer=2, d_model=16, n_head=2)
    for extra, match in [((("head_branch", (1, 0, 0)),), "head 0"), ((("head_branch", (0, 3, 0)),), "more than"),
                         ((("head_branch", (0, 1.5, 0)),), "fraction"),
                         ((("head_branch", (0, 1, 0)), ("head_blocks", (0, 1, 0))), "combined")]:
        bad = tokenloom.ModelSpec(seq_len=9, vocab_size=7, heads=(7, 5, 6), train_order="t", extra=extra)
        with pytest.raises(tokenloom.ConfigError, match=match):
            build_model(bad, cfg, n_classes=2)


@pytest.mark.parametrize("extra,cond", [((), "adaln"), ((("head_blocks", (0, 1)),), "prefix"),
                                        ((("head_branch", (0, 1)),), "prefix"),
                                        ((("head_branch", (0, 2)),), "adaln")])
def test_flops_per_token_of_the_new_backbone_options_against_torch_flop_counter(extra, cond):
    """AdaLN (its linears once per sequence), NAR's extra head block and HMAR's
    mask-path copy: the trainer's count against torch's count of one forward and
    backward pass, within the formula's approximation (as test_model's check)."""
    from torch.utils.flop_counter import FlopCounterMode

    from tokenloom.config import ModelConfig
    from tokenloom.model import build_model

    V, B = 16, 4
    lay = tokenloom.TokenLayout(scales=((4, 4),))
    heads = (V, V) if extra else (V,)
    s = tokenloom.ModelSpec(seq_len=16, vocab_size=V, heads=heads, train_order="t", layout=lay, extra=extra)
    m = build_model(s, ModelConfig(n_layer=2, d_model=32, n_head=4, cond=cond), n_classes=3).train()
    x = torch.randint(0, V, (B, 16), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        out = m(x, torch.zeros(B, dtype=torch.long))
        sum(o.sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
    ratio = counter.get_total_flops() / (B * 16 * m.flops_per_token(16))
    assert 0.75 < ratio < 1.1, ratio


# -- AdaLN with every order: the generator conformance kit over AdaLN backbones --------------

_ADALN_FAST = [("raster", {}, None, None), ("masked", {}, None, "embeddings"), ("random", {}, None, None),
               ("random-parallel", {}, None, "tokens")]
_ADALN_SLOW = [("next-scale", {}, "ms", None), ("neighboring", {}, "pix", None),
               ("next-scale-markov", {"steps": 2}, "ms", "embeddings"), ("next-cell", {}, "pix42", None),
               ("sjd", {}, None, None), ("raster", {"rar": True}, None, None)]


def _adaln_check(monkeypatch, name, config, tok_kind, prefix):
    """The kit (decode-time logits equal teacher-forced ones, NFE, guidance, batch
    independence, determinism) on backbones with ``cond = "adaln"`` — with the class
    token, or (``prefix``) a conditioner's prefix of four positions with padding."""
    import attrs
    from test_conditioning_orders import _MS, _pix, _prefixed

    import tokenloom.backbone.model as model_module
    import tokenloom.testing

    original = model_module.build_model
    inner = _prefixed(prefix) if prefix else original

    def build(spec, config_, **kw):
        return inner(spec, attrs.evolve(config_, cond="adaln"), **kw)

    built = []
    monkeypatch.setattr(model_module, "build_model", lambda *a, **kw: built.append(1) or build(*a, **kw))
    tok = {"ms": _MS, "pix": _pix(3, 4), "pix42": _pix(4, 2), None: None}[tok_kind]
    tokenloom.testing.check("generator", name, tokenizer=tok, max_examples=3, **config)
    assert built  # the kit built its backbones through the patched (AdaLN) builder


@pytest.mark.parametrize("name,config,tok_kind,prefix", _ADALN_FAST, ids=lambda v: str(v))
def test_orders_work_with_an_adaln_backbone(monkeypatch, name, config, tok_kind, prefix):
    _adaln_check(monkeypatch, name, config, tok_kind, prefix)


@pytest.mark.slow
@pytest.mark.parametrize("name,config,tok_kind,prefix", _ADALN_SLOW, ids=lambda v: str(v))
def test_more_orders_work_with_an_adaln_backbone(monkeypatch, name, config, tok_kind, prefix):
    _adaln_check(monkeypatch, name, config, tok_kind, prefix)
