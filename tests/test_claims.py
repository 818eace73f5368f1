"""bench/claims.py: the statistics and verdict rules behind docs/claims.md, on synthetic
figures (each verdict reachable, noise -> inconclusive), the TOML grid writer, the
FLOP-matched steps and the claims' reading of run records. No training here."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import claims as C
from claims import FAILS, HOLDS, UNSURE


def exact(x: float) -> C.Estimate:
    """A figure with no noise at all."""
    return C.Estimate(x, 0.0, C.Z95, (x,))


# ---------------------------------------------------------------------------
# Estimates
# ---------------------------------------------------------------------------


def test_proportion_has_a_width_at_zero_and_one_and_narrows_with_samples():
    for p in (0.0, 1.0):
        e = C.proportion([p, p], 64)
        assert e.hi > e.lo and e.se > 0
        assert e.mean == p
    assert C.proportion([0.5], 1000).se < C.proportion([0.5], 10).se


def test_proportion_uses_the_seed_spread_when_it_is_larger_than_the_binomial_one():
    agree, disagree = C.proportion([0.5, 0.5], 1000), C.proportion([0.1, 0.9], 1000)
    assert disagree.se == pytest.approx(math.sqrt(0.32) / math.sqrt(2))  # sd / √k
    assert disagree.se > 10 * agree.se
    assert disagree.sd == pytest.approx(math.sqrt(0.32))


def test_proportion_rejects_bad_input():
    with pytest.raises(ValueError):
        C.proportion([1.5], 10)
    with pytest.raises(ValueError):
        C.proportion([0.5], 0)
    with pytest.raises(ValueError):
        C.proportion([None, float("nan")], 10)


def test_mean_of_uses_student_t_and_one_noisy_seed_has_no_interval():
    e = C.mean_of([10.0, 12.0])
    assert e.q == pytest.approx(12.706)
    assert e.se == pytest.approx(1.0)
    assert (e.lo, e.hi) == pytest.approx((11 - 12.706, 11 + 12.706))
    assert math.isinf(C.mean_of([3.0]).se)
    assert C.mean_of([64.0], exact=True).se == 0.0
    assert C.t_quantile(2) == pytest.approx(4.303)
    assert C.t_quantile(100) == pytest.approx(C.Z95)


def test_difference_and_ratio_add_errors_in_quadrature():
    a, b = C.Estimate(5.0, 3.0, 1.96), C.Estimate(2.0, 4.0, 2.5)
    d = C.difference(a, b)
    assert (d.mean, d.se, d.q) == (3.0, 5.0, 2.5)
    r = C.ratio(C.Estimate(64.0, 0.0, 1.96), C.Estimate(16.0, 1.6, 1.96))
    assert r.mean == 4.0 and r.se == pytest.approx(0.4)
    with pytest.raises(ValueError):
        C.ratio(a, C.Estimate(0.0, 1.0, 1.96))


def test_estimate_text_shows_mean_sd_interval_and_seeds():
    text = C.proportion([0.8, 0.9], 100).text()
    assert text.startswith("0.85 ± 0.07 [") and text.endswith("(2 seeds)")


# ---------------------------------------------------------------------------
# Verdicts: every outcome reachable, noise inconclusive
# ---------------------------------------------------------------------------


def test_at_least_reaches_every_verdict():
    assert C.verdict_at_least(exact(0.78), exact(0.80), 0.1).verdict == HOLDS
    assert C.verdict_at_least(exact(0.50), exact(0.80), 0.1).verdict == FAILS
    noisy = C.proportion([0.7], 16)  # 16 samples: an interval of about ±0.2
    assert C.verdict_at_least(noisy, exact(0.80), 0.1).verdict == UNSURE
    with pytest.raises(ValueError):
        C.verdict_at_least(exact(1), exact(1), -0.1)


def test_at_least_is_inconclusive_when_the_reference_is_at_the_floor():
    # two orders that fail every image "match" vacuously: without a floor the test holds
    assert C.verdict_at_least(exact(0.0), exact(0.05), 0.1).verdict == HOLDS
    v = C.verdict_at_least(exact(0.0), exact(0.05), 0.1, floor=0.2)
    assert v.verdict == UNSURE and "floor" in v.test
    assert C.verdict_at_least(exact(0.0), exact(0.5), 0.1, floor=0.2).verdict == FAILS


def test_proportion_intervals_are_clipped_to_zero_and_one_but_differences_are_not():
    zero, one = C.proportion([0.0, 0.0], 16), C.proportion([1.0], 16)
    assert zero.lo == 0.0 and zero.hi > 0.0
    assert one.hi == 1.0 and one.lo < 1.0
    d = C.difference(zero, zero)
    assert d.lo < 0 < d.hi
    assert C.mean_of([0.9, 1.0], bounds=(0.0, 1.0)).hi == 1.0


def test_greater_reaches_every_verdict_and_noise_is_inconclusive():
    assert C.verdict_greater(exact(0.6), exact(0.5)).verdict == HOLDS
    assert C.verdict_greater(exact(0.5), exact(0.6)).verdict == FAILS
    assert C.verdict_greater(exact(0.5), exact(0.5)).verdict == FAILS  # not greater
    a, b = C.proportion([0.55, 0.45], 32), C.proportion([0.5, 0.5], 32)
    assert C.verdict_greater(a, b).verdict == UNSURE


def test_threshold_reaches_every_verdict():
    assert C.verdict_threshold(exact(4.0), 2.0).verdict == HOLDS
    assert C.verdict_threshold(exact(1.5), 2.0).verdict == FAILS
    assert C.verdict_threshold(C.mean_of([1.8, 2.6]), 2.0).verdict == UNSURE


def test_u_shape_reaches_every_verdict():
    assert C.verdict_u_shape([exact(x) for x in (0.3, 0.6, 0.2)]).verdict == HOLDS
    assert C.verdict_u_shape([exact(x) for x in (0.2, 0.4, 0.6, 0.8)]).verdict == FAILS  # monotone
    noise = [C.proportion([x], 16) for x in (0.40, 0.45, 0.42)]
    assert C.verdict_u_shape(noise).verdict == UNSURE
    # FID: lower is better, so a valley is the U
    assert C.verdict_u_shape([exact(x) for x in (30, 10, 40)], higher_is_better=False).verdict == HOLDS
    assert C.verdict_u_shape([exact(x) for x in (30, 10, 40)]).verdict == FAILS
    with pytest.raises(ValueError):
        C.verdict_u_shape([exact(1), exact(2)])


def test_saturates_reaches_every_verdict():
    assert C.verdict_saturates([exact(x) for x in (0.2, 0.5, 0.6, 0.6)], 0.05).verdict == HOLDS
    assert C.verdict_saturates([exact(x) for x in (0.5, 0.4, 0.3)], 0.05).verdict == FAILS  # never helps
    assert C.verdict_saturates([exact(x) for x in (0.1, 0.3, 0.6)], 0.05).verdict == FAILS  # still rising
    noise = [C.proportion([x], 16) for x in (0.40, 0.45, 0.42)]
    assert C.verdict_saturates(noise, 0.05).verdict == UNSURE


def test_combine():
    h, f, u = C.Verdict(HOLDS, "a"), C.Verdict(FAILS, "b"), C.Verdict(UNSURE, "c")
    assert C.combine(h, h).verdict == HOLDS
    assert C.combine(h, u).verdict == UNSURE
    assert C.combine(u, f, h).verdict == FAILS
    assert C.combine(h, f).test == "a; b"
    with pytest.raises(ValueError):
        C.Verdict("maybe", "x")


# ---------------------------------------------------------------------------
# The study's plumbing (no training)
# ---------------------------------------------------------------------------


def test_grid_toml_round_trips(tmp_path):
    from tokenloom.config import read_toml

    b = C.BUDGETS["smoke"]
    steps = {"raster": [15, 30], "masked": [14, 28]}
    for study in C.top_grids(b, steps):
        path = tmp_path / f"{study.name}.toml"
        path.write_text(C.to_toml(study.doc, study.comment), encoding="utf-8")
        assert read_toml(path) == study.doc


def test_steps_at_budgets_equalise_flops():
    b = C.BUDGETS["full"]
    steps = C.steps_at_budgets(b, {"raster": 1.0e9, "next-scale": 2.0e9})
    assert steps["raster"] == [round(f * b.top_steps) for f in b.fractions]
    assert steps["next-scale"] == [round(f * b.top_steps / 2) for f in b.fractions]


def test_order_grids_run_lower_budgets_on_the_first_seed_only():
    b = C.BUDGETS["smoke"]
    steps = {o.label: [10, 20] for o in C.orders(b)}
    grids = {g.name: g.doc["grid"] for g in C.order_grids(b, steps)}
    raster = grids["orders-raster"]
    assert raster["sweep"] == {"train.steps": [10, 20]}
    assert raster["exclude"] == [{"seed": 1, "train.steps": 10},
                                 {"generator": {"name": "raster", "rar": True}, "train.steps": 10}]
    assert {"name": "zipar", "window": 2} in raster["generator"]


def _run(study, label, metrics, *, steps=10, seed=0, n=100, chain=("cfg", "top-k"), cfg=1.0, tokenizer="vq"):
    return {"study": study, "label": label, "metrics": metrics, "steps": steps, "seed": seed, "n": n,
            "chain": chain, "cfg": cfg, "tokenizer": tokenizer, "flops": 1e9 * steps}


def test_claims_read_the_top_budget_and_report_missing_figures():
    runs = [_run("orders-raster", "raster", {"shapes_valid": 0.1, "nfe": 64.0}, steps=5),
            _run("orders-raster", "raster", {"shapes_valid": 0.80, "nfe": 64.0}, steps=10),
            _run("orders-raster", "raster", {"shapes_valid": 0.82, "nfe": 64.0}, steps=10, seed=1),
            _run("orders-next-scale", "next-scale", {"shapes_valid": 0.81, "nfe": 6.0}, steps=4),
            _run("orders-next-scale", "next-scale", {"shapes_valid": 0.83, "nfe": 6.0}, steps=4, seed=1)]
    figures, verdict = C.var_claim(runs)
    assert verdict.verdict == HOLDS
    assert "NFE 6.0 vs 64.0" in figures
    runs[3]["metrics"]["shapes_valid"] = runs[4]["metrics"]["shapes_valid"] = 0.2
    assert C.var_claim(runs)[1].verdict == FAILS
    rows = {r["paper"]: r for r in C.evaluate_claims(runs)}
    assert rows["VAR"]["verdict"] == FAILS
    assert rows["PAR"]["verdict"] == UNSURE and rows["PAR"]["figures"].startswith("not measured")
    assert len(C.evaluate_claims(runs)) == len(C.CLAIMS)


def test_curves_group_by_order_and_budget():
    runs = [_run("orders-raster", "raster", {"shapes_valid": 0.2, "nfe": 64.0, "fid": 50.0}, steps=5),
            _run("orders-raster", "raster", {"shapes_valid": 0.6, "nfe": 64.0, "fid": 20.0}, steps=10),
            _run("orders-raster", "raster", {"shapes_valid": 0.7, "nfe": 64.0, "fid": 22.0}, steps=10, seed=1),
            _run("cfg", "raster", {"shapes_valid": 0.9, "nfe": 64.0})]
    data = C.curves(runs)
    assert list(data) == ["raster"]
    assert [p["steps"] for p in data["raster"]] == [5, 10]
    assert data["raster"][1]["seeds"] == 2 and data["raster"][1]["valid"].mean == pytest.approx(0.65)


def test_codebook_study_compares_the_same_vocabulary():
    for codebook in (64, 128, 512):
        levels, bits, groups = C.same_vocabulary(codebook)
        assert math.prod(levels) == 2 ** bits == codebook
        assert bits % groups == 0
    with pytest.raises(ValueError):
        C.same_vocabulary(100)
    toks = C.tokenizers(C.BUDGETS["full"])
    assert toks["vq-no-restart"]["restart_every"] == 0
    assert math.prod(toks["fsq"]["levels"]) == toks["vq"]["codebook_size"] == 2 ** toks["lfq"]["bits"]


def test_base_chain_guidance_only_when_asked():
    b = C.BUDGETS["smoke"]
    assert [t["name"] for t in C.chain(b)] == ["top-k"]
    assert C.chain(b, scale=2.0)[0] == {"name": "cfg", "scale": 2.0}


def test_ablation_reports_draw_quality_against_training_flops(tmp_path):
    from tokenloom.reports import plot_vs_train_flops

    def row(gen, steps, flops, valid):
        return {"labels": {"generator": gen, "train.steps": str(steps)},
                "metrics": {"train_flops": {"mean": flops, "std": None, "n": 1},
                            "shapes_valid": {"mean": valid, "std": 0.01, "n": 2}}}

    one_budget = [row("raster", 10, 1e9, 0.2), row("masked", 10, 1e9, 0.1)]
    assert not plot_vs_train_flops(one_budget, "shapes_valid", tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()
    curves = one_budget + [row("raster", 20, 2e9, 0.4), row("masked", 20, 2e9, 0.3)]
    assert plot_vs_train_flops(curves, "shapes_valid", tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plot_vs_train_flops(curves, "fid", tmp_path / "c.png")  # no such metric


def _synthetic_study(valid: dict[str, float], *, n=200) -> list[dict]:
    """Runs of every study of bench/claims.py at the top budget (two seeds), with the given
    validities by label (default 0.8) and the NFE each order has on an 8×8 grid."""
    nfe = {"raster": 64, "raster-rar": 64, "zipar": 40, "random": 64, "random-parallel": 16, "masked": 8,
           "next-block": 8, "next-cell": 16, "neighboring": 15, "par": 19, "next-scale": 6,
           "next-scale-markov": 21, "depth-stack": 16, "next-frequency": 7}
    study_of = {"raster-rar": "raster", "zipar": "raster", "random-parallel": "random"}
    runs = []
    for seed in (0, 1):
        for label, k in nfe.items():
            v = valid.get(label, 0.8)
            runs.append(_run(f"orders-{study_of.get(label, label)}", label,
                             {"shapes_valid": v, "nfe": float(k), "fid": 10.0}, seed=seed, n=n))
        for label, chain, acc, k in (("raster", ("top-k",), None, 64), ("sjd", ("top-k",), 0.5, 24),
                                     ("sjd", ("top-k", "gsd"), 0.8, 16), ("speculative", ("top-k",), 0.5, 30),
                                     ("speculative", ("top-k", "lantern"), 0.8, 20)):
            runs.append(_run("decoders", label, {"shapes_valid": valid.get(label, 0.8), "nfe": float(k) + 0.1 * seed,
                                                 "acceptance_rate": acc}, seed=seed, n=n, chain=chain))
        for s, v, f in ((1.0, 0.5, 20.0), (2.0, 0.8, 10.0), (4.0, 0.4, 30.0)):
            runs.append(_run("cfg", "raster", {"shapes_valid": v, "fid": f + seed, "nfe": 64.0}, seed=seed, n=n,
                             cfg=s))
        for t, v in ((2, 0.3), (4, 0.6), (8, 0.8), (16, 0.8)):
            runs.append(_run("masked-steps", f"masked-{t}", {"shapes_valid": v, "nfe": float(t)}, seed=seed, n=n))
        for tok, u in (("vq", 0.9), ("vq-no-restart", 0.3), ("fsq", 1.0), ("lfq", 0.99)):
            runs.append(_run("codebook", "raster", {"codebook_utilisation": u + 0.001 * seed}, seed=seed,
                             tokenizer=tok))
        runs.append(_run("inpainting", "random", {"shapes_valid": valid.get("inpainting", 0.85), "nfe": 32.0},
                         seed=seed, n=n))
    return runs


def test_every_claim_reads_its_figures_and_can_hold():
    rows = C.evaluate_claims(_synthetic_study({"raster-rar": 0.9, "next-scale-markov": 0.9}))
    assert len(rows) == len(C.CLAIMS)
    assert not [r for r in rows if r["figures"].startswith("not measured")]
    verdicts = {(r["paper"], r["claim"]): r["verdict"] for r in rows}
    # every claim holds on these figures except ZipAR (40 of 64 passes is not "far fewer")
    failing = {k for k, v in verdicts.items() if v != HOLDS}
    assert failing == {k for k in verdicts if k[0] == "ZipAR"}, failing
    assert verdicts[next(k for k in verdicts if k[0] == "ZipAR")] == FAILS


def test_claims_do_not_hold_on_bad_figures():
    rows = {r["paper"]: r["verdict"] for r in C.evaluate_claims(
        _synthetic_study({"next-scale": 0.2, "masked": 0.3, "random": 0.3, "raster-rar": 0.6, "par": 0.4,
                          "next-scale-markov": 0.05, "depth-stack": 0.2, "sjd": 0.5, "inpainting": 0.1}))}
    for paper in ("VAR", "RAR", "SJD", "PAR", "HMAR", "RQ-Transformer"):
        assert rows[paper] == FAILS, paper


def test_top_budget_sweeps_reuse_the_models_of_the_orders_grids():
    from tokenloom.ablation import plan_grid

    b = C.BUDGETS["smoke"]
    steps = {o.label: [10, 20] for o in C.orders(b)}
    steps["next-frequency"] = [3, 7]
    b = C.with_study_warmup(b, steps)
    assert b.warmup == 3
    grids = {g.name: g.doc for g in C.order_grids(b, steps) + C.top_grids(b, steps)}

    def models(doc):
        return {k for pc in plan_grid(doc).cells for k in pc.models}

    trained = models(grids["orders-raster"]) | models(grids["orders-masked"]) | models(grids["orders-random"])
    assert models(grids["cfg"]) <= trained
    assert models(grids["masked-steps"]) <= trained
    assert len(models(grids["decoders"]) - trained) == len(b.seeds)  # only the speculative drafts are new
    assert models(C.inpainting_doc(b, steps, seed=1)) <= trained


# ---------------------------------------------------------------------------
# The budgets' cuts, the plan they imply, docs/orders.md from a fake result set
# ---------------------------------------------------------------------------


def _cells(doc):
    from tokenloom.grid import expand_grid

    return [c.config for c in expand_grid(doc)[1]]


def test_only_the_curve_orders_run_every_budget_and_rar_runs_the_top_only():
    b = C.BUDGETS["full"]
    assert set(b.curve_orders) == {"raster", "masked", "next-scale", "random"}
    steps = {o.label: [10, 20, 40] for o in C.orders(b)}
    grids = {g.name: g.doc for g in C.order_grids(b, steps)}
    raster = [(c["generator"].get("rar", False), c["generator"]["name"], c["train"]["steps"], c["seed"])
              for c in _cells(grids["orders-raster"])]
    # raster and zipar at 10, 20 (seed 0) and 40 (seeds 0, 1); RAR at 40 only, on both seeds
    assert sorted(x for x in raster if x[0]) == [(True, "raster", 40, 0), (True, "raster", 40, 1)]
    assert sorted(x[2:] for x in raster if x[1] == "zipar") == [(10, 0), (20, 0), (40, 0), (40, 1)]
    par = [(c["train"]["steps"], c["seed"]) for c in _cells(grids["orders-par"])]
    assert par == [(40, 0)]  # not a curve order: the top budget, other_seeds
    assert "sweep" not in grids["orders-par"]["grid"]
    assert C.top_seeds(b, "par") == (0,) and C.top_seeds(b, "raster") == (0, 1)
    every = C.replace(b, curve_orders=(), other_seeds=None)
    assert all(C.on_curve(every, o.label) for o in C.orders(b))


def test_cuts_and_the_budget_table_state_every_cut():
    b = C.BUDGETS["full"]
    steps = {o.label: [94, 188, 375] for o in C.orders(b)}
    text = " ".join(C.cuts(b, steps))
    for phrase in ("`raster`, `random`, `masked`, `next-scale` only", "`par`", "RAR train at the top budget only",
                   "first seed only", "seeds at the top budget: 0, 1", "Agresti–Caffo", "128 samples per cell",
                   "decode raster's models", "top budget 375 raster steps"):
        assert phrase in text, phrase
    every = C.replace(b, curve_orders=(), other_seeds=None)
    assert "Agresti" not in " ".join(C.cuts(every, steps))
    table = C.budget_table()
    assert sum(line.startswith("| `") for line in table) == len(C.BUDGETS)
    full_row = next(line for line in table if line.startswith("| `full`"))
    assert "| 375 |" in full_row and "raster, masked, next-scale, random" in full_row and "| 2 / 1 |" in full_row


def test_the_recipe_sets_the_backbone_options_but_not_the_top_budget(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("""
[data]
name = "shapes"
size = 16
n = 20000
[tokenizer]
name = "vq"
downsample = 2
codebook_size = 128
steps = 900
[model]
n_layer = 4
d_model = 128
n_head = 4
cond = "adaln"
[train]
steps = 750
lr = 4e-3
label_dropout = 0.1
[[sampler]]
name = "top-k"
k = 4
""", encoding="utf-8")
    full, where = C.apply_recipe(C.BUDGETS["full"], recipe)
    assert where.endswith("recipe.toml")
    assert (full.n, full.codebook, full.tokenizer_steps, full.top_k, full.lr) == (20000, 128, 900, 4, 4e-3)
    assert full.top_steps == C.BUDGETS["full"].top_steps and full.recipe_steps == 750
    doc = C.base_doc(full, steps=10)
    assert doc["model"]["cond"] == "adaln" and doc["train"]["label_dropout"] == 0.1
    small, _ = C.apply_recipe(C.BUDGETS["small"], recipe)
    assert small.tokenizer_steps == C.BUDGETS["small"].tokenizer_steps  # small keeps its shorter fits
    assert C.apply_recipe(C.BUDGETS["smoke"], recipe)[0] == C.BUDGETS["smoke"]
    assert "the recipe file trains 750" in " ".join(C.cuts(full, {o.label: [1, 2, 3] for o in C.orders(full)}))
    assert "not carried over" not in where  # everything in this recipe is applied


def test_recipe_settings_the_study_does_not_follow_are_named(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("""
[tokenizer]
name = "vq"
downsample = 2
codebook_size = 128
encoder = "patchwise"
[[sampler]]
name = "top-p"
p = 0.95
""", encoding="utf-8")
    full, where = C.apply_recipe(C.BUDGETS["full"], recipe)
    assert where.endswith("(not carried over: tokenizer.encoder, sampler 'top-p')")
    assert full.codebook == 128 and full.top_k == C.BUDGETS["full"].top_k
    # the committed study recipe is followed in full; the demo's is not (its encoder and top-p)
    from tokenloom.config import read_toml

    assert C.not_carried_over(read_toml(C.RECIPE)) == []
    assert C.not_carried_over(read_toml(C.ROOT / "examples" / "shapes-recipe.toml")) == [
        "tokenizer.encoder", "sampler 'top-p'"]


def test_the_plan_counts_each_shared_model_once():
    b = C.BUDGETS["smoke"]
    steps = {o.label: [10, 20] for o in C.orders(b)}
    b = C.with_study_warmup(b, steps)
    plan = C.study_plan(b, steps)
    trained = sorted(plan["models"].values())
    # raster: 10 (seed 0), 20 (seeds 0, 1); RAR: 20 × 2 — the decoders, zipar, the guidance sweep reuse them
    assert trained.count(("raster", 10)) == 1 and trained.count(("raster", 20)) == 4
    assert trained.count(("par", 20)) == 1 and ("par", 10) not in trained
    assert trained.count(("masked", 20)) == 2  # the MaskGIT sweep reuses the two top-budget models
    assert len(plan["aux"]) == 2  # the speculative drafts, one per seed
    assert sorted(set(plan["tokenizers"].values())) == ["frequency", "fsq", "lfq", "multiscale", "rq", "vq",
                                                          "vq-no-restart"]
    guided = [f for o, _, f in plan["cells"] if f == 2.0]
    assert len(guided) == len(b.cfg_scales) * 2


def test_orders_doc_is_generated_from_the_result_set(tmp_path):
    runs = _synthetic_study({"random": 0.5})
    lay = {"vq": (64, 128), "multiscale": (130, 128), "rq": (64, 128), "frequency": (256, 27)}
    rows = C.order_rows(runs, C.BUDGETS["small"], lay)
    labels = [r["label"] for r in rows]
    assert labels[:3] == ["raster", "raster-rar", "zipar"] and "random-parallel" in labels
    assert len(labels) == 14
    by = {r["label"]: r for r in rows}
    assert by["next-scale"]["nfe_ratio"] == pytest.approx(6 / 64)
    assert by["random"]["valid"].mean == pytest.approx(0.5) and by["random"]["seeds"] == 2
    assert by["zipar"]["shared"] == "raster" and by["raster"]["shared"] is None
    ceilings = {"vq": {"options": {"codebook_size": 128}, "kind": "vq", "L": 64, "vocab": 128, "n": 200,
                       "psnr_db": 40.0, "shapes_valid": 0.98, "shapes_colour_ok": 1.0, "shapes_count_ok": 1.0}}
    md = C.orders_markdown(rows, ceilings, header="HEADER")
    assert md.startswith("HEADER")
    assert "| `next-scale` | multiscale (130) |" in md and "| 0.094 |" in md
    assert "40 (the `raster` model)" not in md and "10 (the `raster` model)" in md  # _run's default steps
    assert "| vq | vq: codebook_size 128 | 64 | 128 | 40.0 | 0.98 |" in md
    doc = tmp_path / "orders.md"
    doc.write_text(f"intro\n{C.ORDERS_BEGIN}\nold table\n{C.ORDERS_END}\noutro\n", encoding="utf-8")
    C.write_marked(doc, md)
    text = doc.read_text(encoding="utf-8")
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old table" not in text
    C.write_marked(doc, "again")  # idempotent: the markers stay
    assert doc.read_text(encoding="utf-8") == f"intro\n{C.ORDERS_BEGIN}\nagain\n{C.ORDERS_END}\noutro\n"
    (tmp_path / "bare.md").write_text("no markers", encoding="utf-8")
    with pytest.raises(ValueError, match="markers"):
        C.write_marked(tmp_path / "bare.md", md)


def test_claims_doc_states_the_cuts_and_the_run_conditions():
    b = C.BUDGETS["small"]
    runs = _synthetic_study({})
    steps = {o.label: [31, 62, 125] for o in C.orders(b)}
    cond = C.run_conditions(1800.0, 2400.0, 2, [4.0, 6.0])
    assert cond.startswith("wall time 30.0 min, process CPU time 40.0 min on 2 torch threads")
    assert "load average 5.0 on average" in cond and "4.0–6.0" in cond
    md = C.claims_markdown(b, C.evaluate_claims(runs), C.curves(runs), steps, recipe="r", seconds=1800.0,
                           command="bench/claims.py --budget small", plot=None, conditions=cond,
                           estimates={"full": "EST"})
    assert "**Small budget.**" in md and f"Run conditions: {cond}." in md
    assert 'cond = "prefix" (the default)' in md  # the conditioning is always stated
    assert "## What this budget cuts" in md and "--budget full --estimate`, measured EST." in md
    assert md.count("| `") >= len(C.BUDGETS)


def test_a_partial_report_reads_only_finished_cells(tmp_path):
    b = C.BUDGETS["smoke"]
    steps = {o.label: [10, 20] for o in C.orders(b)}
    study = next(g for g in C.order_grids(b, steps) if g.name == "orders-raster")
    runs, planned = C.finished_runs(study, tmp_path)
    assert runs == [] and planned == 8  # raster, zipar: 10 (seed 0), 20 (seeds 0, 1); RAR: 20 (seeds 0, 1)
    rows = {r["paper"]: r for r in C.evaluate_claims(runs)}
    assert rows["VAR"]["figures"].startswith("not measured") and rows["VAR"]["verdict"] == UNSURE
