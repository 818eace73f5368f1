"""The trainer: schedule, seeded steps, exact resumption, learning, held-out NLL."""

from __future__ import annotations

import math

import pytest
import torch

import tokenloom
from tokenloom.backbone.instrumented import InstrumentedModel
from tokenloom.config import ModelConfig, TrainConfig
from tokenloom.model import build_model
from tokenloom.train import batch_indices, heldout_nll, lr_at, make_batch, train


def setup(name: str = "raster", **gen_kw):
    tok = tokenloom.create("tokenizer", "pixel", bits=1, pool=4, image_shape=(3, 8, 12))  # 2×3 grid, V = 8
    gen = tokenloom.create("generator", name, tokenizer=tok, **gen_kw)
    g = torch.Generator().manual_seed(0)
    # learnable data: class c always has code c + 1 at even positions, noise elsewhere
    labels = torch.randint(0, 3, (96,), generator=g)
    codes = torch.randint(0, 8, (96, 6), generator=g)
    codes[:, ::2] = labels[:, None] + 1
    model = build_model(gen.model_spec(), ModelConfig(n_layer=2, d_model=32, n_head=2), n_classes=3, seed=1)
    return tok, gen, codes, labels, model


def test_warmup_then_cosine_to_a_tenth():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup=10)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    mid = 10 + 45
    assert lr_at(mid, cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))


def test_batches_are_a_pure_function_of_seed_and_step():
    a = batch_indices(100, 16, seed=3, step=7)
    assert torch.equal(a, batch_indices(100, 16, seed=3, step=7))
    assert not torch.equal(a, batch_indices(100, 16, seed=3, step=8))
    halves = torch.cat([batch_indices(100, 16, seed=3, step=7, rank=r, world=2) for r in range(2)])
    assert sorted(halves.tolist()) == sorted(a.tolist())  # ranks split the same global batch
    _, gen, codes, labels, _ = setup("random")
    b1 = make_batch(gen, codes, labels, a % 96, seed=3, step=7, n_steps=10, label_dropout=0.5, null_class=3)
    b2 = make_batch(gen, codes, labels, a % 96, seed=3, step=7, n_steps=10, label_dropout=0.5, null_class=3)
    assert torch.equal(b1.inputs, b2.inputs) and torch.equal(b1.positions, b2.positions)
    assert torch.equal(b1.cond, b2.cond) and (b1.cond == 3).any() and (b1.cond < 3).any()


def test_resumed_training_ends_with_the_same_weights(tmp_path):
    cfg = TrainConfig(steps=12, batch_size=8, warmup=3, label_dropout=0.2)
    _, gen, codes, labels, straight = setup("raster", rar=True)
    train(straight, gen, codes, labels, cfg, seed=5, null_class=3, progress=False)

    _, gen2, _, _, resumed = setup("raster", rar=True)
    ckpt = tmp_path / "state.safetensors"

    class Killed(Exception):
        pass

    def kill_at_5(step, n_steps, _orig=gen2.on_train_step):
        if step == 5:
            raise Killed  # the process dies in step 5; the last checkpoint is from step 4
        _orig(step, n_steps)

    gen2.on_train_step = kill_at_5
    with pytest.raises(Killed):
        train(resumed, gen2, codes, labels, cfg, seed=5, null_class=3, checkpoint=ckpt, checkpoint_every=2,
              progress=False)
    assert ckpt.is_file()
    _, gen3, _, _, fresh = setup("raster", rar=True)  # a new process: fresh weights, state from the file
    second = train(fresh, gen3, codes, labels, cfg, seed=5, null_class=3, checkpoint=ckpt, progress=False)
    assert second.resumed_from == 4 and second.steps == 12
    for (name, p), q in zip(straight.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), f"{name} differs after resuming"


def test_training_learns_and_nll_beats_uniform():
    _tok, gen, codes, labels, model = setup("raster")
    w = InstrumentedModel(model)
    before = heldout_nll(gen, w, codes[:32], labels[:32])
    res = train(model, gen, codes, labels, TrainConfig(steps=80, batch_size=32, lr=3e-3, warmup=5), seed=0,
                null_class=3, progress=False)
    after = heldout_nll(gen, w, codes[:32], labels[:32])
    assert after["uniform_bits_per_image"] == pytest.approx(6 * math.log2(8))
    assert before["nll_bits_per_image"] == pytest.approx(18, abs=1.5)  # an untrained model is near uniform
    # even positions are determined by the class: the ideal is 3 noise tokens × 3 bits = 9 bits
    assert after["nll_bits_per_image"] < 12 < before["nll_bits_per_image"]
    assert after["nll_bits_per_token"] == pytest.approx(after["nll_bits_per_image"] / 6)
    assert after["nll_bits_per_dim"] == pytest.approx(after["nll_bits_per_image"] / (3 * 8 * 12))
    assert res.losses[-1] < res.losses[0] and res.tokens == 80 * 32 * 6
    assert res.flops == res.tokens * model.flops_per_token(6)


def test_orders_without_exact_likelihood_report_none():
    _, gen, codes, labels, model = setup("masked")
    assert heldout_nll(gen, InstrumentedModel(model), codes, labels) is None


def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path):
    _, gen, codes, labels, model = setup()
    bad = tmp_path / "state.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(tokenloom.CheckpointError):
        train(model, gen, codes, labels, TrainConfig(steps=2, batch_size=4), seed=0, null_class=3, checkpoint=bad,
              progress=False)


def test_bf16_autocast_trains_and_keeps_fp32_weights():
    _, gen, codes, labels, model = setup("random")
    res = train(model, gen, codes, labels, TrainConfig(steps=3, batch_size=8, lr=3e-3, warmup=1, bf16=True),
                seed=0, null_class=3, progress=False)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert all(math.isfinite(loss) for loss in res.losses)


@pytest.mark.slow
def test_torch_compile_gives_the_same_first_loss():
    cfg = {"steps": 2, "batch_size": 8, "warmup": 1}
    _, gen, codes, labels, eager = setup()
    a = train(eager, gen, codes, labels, TrainConfig(**cfg), seed=0, null_class=3, progress=False)
    _, gen, codes, labels, compiled = setup()
    b = train(compiled, gen, codes, labels, TrainConfig(**cfg, compile=True), seed=0, null_class=3, progress=False)
    assert b.losses[0] == pytest.approx(a.losses[0], abs=1e-4)
