"""Generator properties: spec and teacher forcing, no leak, NFE, determinism,
known tokens, and for exact likelihoods decode-time log-probabilities and a
chi-square test of the samples."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..contract.errors import ConfigError, TokenloomError
from ..contract.interfaces import SamplerContext, StepInfo
from .common import (
    _expect_error,
    _given,
    _hypothesis,
    _kit_registry,
    _settings,
    continuous_layout_for,
)


def _tiny_model(spec: Any, *, pos: str = "learned", n_classes: int = 3, seed: int = 0) -> Any:
    from ..backbone.instrumented import InstrumentedModel
    from ..backbone.model import build_model
    from ..contract.config import ModelConfig

    return InstrumentedModel(build_model(spec, ModelConfig(n_layer=2, d_model=16, n_head=2, pos=pos),
                                         n_classes=n_classes, seed=seed).eval())


def _attach_tiny_auxiliary(gen: Any, spec: Any, *, pos: str, seed: int) -> None:
    """Untrained auxiliary models (e.g. a speculative draft) for a generator
    that asks for them, sized from the tiny target's config."""
    from ..backbone.instrumented import InstrumentedModel
    from ..backbone.model import build_model
    from ..contract.config import ModelConfig

    wanted = gen.auxiliary_models(ModelConfig(n_layer=2, d_model=16, n_head=2, pos=pos))
    if wanted:
        gen.attach_models({name: InstrumentedModel(build_model(spec, cfg, n_classes=3, seed=seed + 1 + i).eval())
                           for i, (name, cfg) in enumerate(wanted.items())})


def _logits_of(model: Any, batch: Any) -> torch.Tensor:
    out = model(batch.inputs, batch.cond, positions=batch.positions, attn_mask=batch.attn_mask,
                target_positions=batch.extra.get("target_positions"))
    out = out if isinstance(out, tuple) else (out,)
    return torch.stack([o.float() for o in out], -2)  # (B, T, n_heads, V) when the heads agree in V


def _seeded_batch(gen: Any, codes: torch.Tensor, cond: torch.Tensor, seed: int) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return gen.training_batch(codes, cond)


def _recording_chain(samplers: list) -> Any:
    from ..blocks.sampling import SamplerChain

    class RecordingChain(SamplerChain):
        def __init__(self, procs: list) -> None:
            super().__init__(procs)
            self.pending: list[torch.Tensor] = []
            self.logp: list[torch.Tensor] = []  # per draw: log p of the drawn codes, (B,) or (B, k)
            self.calls = 0
            self.inside = False

        def _recorded(self, call: Callable, logits: torch.Tensor, info: StepInfo | None) -> torch.Tensor:
            if self.inside:  # process() and __call__ may be implemented through each other
                return call(logits, info)
            self.inside = True
            try:
                self.calls += 1
                self.pending.append(logits.detach().double().clone())
                return call(logits, info)
            finally:
                self.inside = False

        def __call__(self, logits: torch.Tensor, info: StepInfo | None = None) -> torch.Tensor:
            return self._recorded(super().__call__, logits, info)

        def process(self, logits: torch.Tensor, info: StepInfo | None = None) -> torch.Tensor:
            return self._recorded(getattr(super(), "process", super().__call__), logits, info)

        def draw(self, processed: torch.Tensor, rng: Any, step: int, *, stream: int = 0) -> torch.Tensor:
            tokens = super().draw(processed, rng, step, stream=stream)
            if self.pending:
                raw = self.pending.pop()
                if raw.shape[:-1] == tokens.shape:
                    self.logp.append(torch.log_softmax(raw, -1).gather(-1, tokens[..., None].to(raw.device))[..., 0])
            return tokens

        def decode_log_likelihood(self, B: int, L: int) -> torch.Tensor | None:
            """Sum of the recorded log-probabilities per row, or None when the
            loop did not draw each of the ``L`` codes exactly once through
            ``chain(logits)`` then ``chain.draw`` (speculative loops)."""
            if self.pending or len(self.logp) == 0 or self.calls != len(self.logp):
                return None
            per_row = [lp.reshape(B, -1) for lp in self.logp if lp.numel() % B == 0]
            if len(per_row) != len(self.logp) or sum(x.shape[1] for x in per_row) != L:
                return None
            return torch.cat(per_row, 1).sum(1)

    return RecordingChain(samplers)


def _peaked(model: Any, scale: float = 20.0) -> Any:
    """Scale the output heads of a tiny untrained model so that its
    conditionals are far from uniform (the chi-square test then has teeth)."""
    inner = getattr(model, "model", model)
    with torch.no_grad():
        for p in inner.heads.parameters():
            p.mul_(scale)
    return model


def chi_square_pvalue(samples: torch.Tensor, every: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square p-value of ``samples`` (``[N, L]`` codes) against
    the distribution ``probs`` over the sequences ``every`` (``[S, L]``);
    sequences with an expected count under 5 are pooled into one cell."""
    V = int(max(every.max(), samples.max())) + 1
    place = V ** torch.arange(every.shape[1] - 1, -1, -1, dtype=torch.float64)
    index = {int(k): i for i, k in enumerate((every.double() @ place).long().tolist())}
    counts = torch.zeros(every.shape[0], dtype=torch.float64)
    for k, n in zip(*torch.unique((samples.double() @ place).long(), return_counts=True), strict=True):
        if int(k) not in index:
            return 0.0  # a sequence outside the support
        counts[index[int(k)]] = float(n)
    expected = probs.double() / probs.double().sum() * samples.shape[0]
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]]) if small.any() else counts
    exp = torch.cat([expected[~small], expected[small].sum()[None]]) if small.any() else expected
    keep = exp > 0
    if (obs[~keep] > 0).any():
        return 0.0
    obs, exp = obs[keep], exp[keep]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = max(int(obs.numel()) - 1, 1)
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _likelihood_properties(name: str, gen: Any, tok: Any, *, seed: int, n_samples: int) -> None:
    """Decode-time log-probabilities equal the teacher-forced ``log_likelihood``;
    when every sequence can be enumerated, ``exp(log_likelihood)`` sums to one
    and samples follow it (chi-square)."""
    from ..blocks.rng import RowRNG
    from ..blocks.sampling import SamplerChain

    L, V = tok.layout.length, tok.vocab_size
    spec = gen.model_spec()
    # what the decoding loop saw equals one teacher-forced pass over what it generated
    B = 6
    cond = torch.arange(B) % 4  # 3 is the null class of the tiny model (unconditional rows)
    for pos in ("rope2d", "learned"):
        model = _peaked(_tiny_model(spec, pos=pos, seed=seed))
        _attach_tiny_auxiliary(gen, spec, pos=pos, seed=seed)
        recorder = _recording_chain([])
        recorder.bind(SamplerContext(vocab_size=V, code_embeddings=tok.code_embeddings(),
                                     token_embeddings=model.token_embeddings()))
        with torch.no_grad():
            out = gen.generate(model, recorder, cond, rng=RowRNG(seed, torch.arange(B)))
            decoded = recorder.decode_log_likelihood(B, L)
            if decoded is None:
                break  # a loop that does not draw each code once through the chain (speculative decoding)
            forced = gen.log_likelihood(model, out, cond).double()
        gap = (decoded - forced).abs().max().item()
        assert gap <= 1e-5 * (L + forced.abs().max().item()), (
            f"{name}: the logits the decoding loop handed to the sampler chain give the generated codes "
            f"log-probabilities {[round(v, 5) for v in decoded.tolist()]}, but log_likelihood (teacher "
            f"forcing) says {[round(v, 5) for v in forced.tolist()]} ({pos} positions) — decoding and "
            "training disagree")

    if V**L > 256:
        return
    every = torch.cartesian_prod(*[torch.arange(V)] * L).reshape(-1, L) if L > 1 else torch.arange(V)[:, None]
    with torch.no_grad():
        for c in (0, 3):
            ll = gen.log_likelihood(model, every, torch.full((every.shape[0],), c)).double()
            total = torch.logsumexp(ll, 0)
            assert abs(total.item()) < 1e-4, (
                f"{name}: exp(log_likelihood) sums to {total.exp().item():.6f} over all codes (class {c})")
        cond = torch.full((n_samples,), 1)
        probs = gen.log_likelihood(model, every, torch.full((every.shape[0],), 1)).double().exp()
        samples = gen.generate(model, SamplerChain([]), cond, rng=RowRNG(seed + 7, torch.arange(n_samples)))
    pvalue = chi_square_pvalue(samples, every, probs)
    assert pvalue > 1e-4, (
        f"{name}: {n_samples} samples of a tiny model do not follow exp(log_likelihood) over the {every.shape[0]} "
        f"sequences (chi-square p = {pvalue:.2g}) — decoding samples another distribution than the one "
        "log_likelihood reports")


def check_generator(name: str, *, registry: Any = None, tokenizer: tuple[str, dict] | None = None,
                    max_examples: int = 8, n_samples: int = 3000,
                    continuous_tokenizer: tuple[str, dict] | None = None,
                    token_kinds: tuple[str, ...] = ("discrete", "continuous"), **config: Any) -> None:
    """Generator properties, over random token layouts (grids of 1–4 × 1–4
    pixel tokens, with and without residual depth) unless ``tokenizer=(name,
    options)`` (with ``image_shape`` among the options) fixes one:

    - the spec and teacher-forcing batch are well formed;
    - no leak: changing a code leaves the logits that predict it unchanged
      (untrained model, fp32, 1e-5);
    - ``generate`` returns ``[B, L]`` codes in range; NFE equals
      ``expected_nfe()``, with and without classifier-free guidance (one
      batched pass for both rows);
    - same seed → identical codes, and image i is the same alone or in a batch;
    - with ``supports_known``, every known token is kept;
    - with ``exact_likelihood``, ``log_likelihood`` is a log-probability and
      sums to 1 over every sequence of a small layout; the log-probabilities
      of the drawn codes under the logits the decoding loop handed to the
      chain equal ``log_likelihood`` of the generated codes (loops that draw
      each code once: not the speculative ones); and ``n_samples`` samples of
      a tiny peaked model follow ``exp(log_likelihood)`` (chi-square, p >
      1e-4) — unless the class sets ``samples_follow_likelihood = False``
      (an order whose likelihood is that of another order, e.g. ``random``'s
      raster-order likelihood: they agree only for a trained model).

    A generator that declares ``continuous_ok`` is checked on continuous tokens too
    (:func:`_continuous_properties`): on the kit's continuous tokenizer with the grid(s) of
    ``tokenizer`` (random grids when it is None; ``patch`` for one grid, ``kl`` with ``scales`` for
    square multi-scale layouts: :func:`~tokenloom.testing.common.continuous_layout_for`), or on
    ``continuous_tokenizer=(name, options)`` built from ``registry``. A ``tokenizer`` that is itself
    continuous is checked only as such. ``token_kinds`` selects the kinds checked (default both).

    The generator is always handed a :class:`~tokenloom.sampling.SamplerChain`.
    """
    from ..contract.registry import build_component, get_registry

    registry = registry or get_registry()
    kit = _kit_registry()
    cls = registry.get("generator", name).cls
    kinds = set(token_kinds)
    if not kinds or kinds - {"discrete", "continuous"}:
        raise ValueError(f"token_kinds must name 'discrete' and/or 'continuous', got {token_kinds!r}")
    given_tok = None
    if tokenizer is not None:
        with torch.random.fork_rng(devices=[]):  # (its kind and layout only: the global RNG as before)
            given_tok = build_component(registry, "tokenizer", tokenizer[0], dict(tokenizer[1]), path="tokenizer")
        if getattr(given_tok, "continuous", False):  # the caller's tokenizer is continuous: only that kind
            continuous_tokenizer, given_tok, tokenizer = tokenizer, None, None
            kinds.discard("discrete")
    if "discrete" in kinds:
        _discrete_properties(name, cls, registry=registry, kit=kit, tokenizer=tokenizer, config=config,
                             max_examples=max_examples, n_samples=n_samples)
    if continuous_tokenizer is not None and not getattr(cls, "continuous_ok", False):
        raise AssertionError(f"{name}: checked on continuous tokens ({continuous_tokenizer[0]}) but it does not "
                             "declare continuous_ok (the base Generator refuses a continuous tokenizer)")
    if "continuous" in kinds and getattr(cls, "continuous_ok", False):
        _continuous_properties(name, registry=registry, config=config, given=continuous_tokenizer,
                               layout=None if given_tok is None else given_tok.layout,
                               max_examples=max(2, (max_examples + 1) // 2))


def _discrete_properties(name: str, cls: type, *, registry: Any, kit: Any, tokenizer: tuple[str, dict] | None,
                         config: dict, max_examples: int, n_samples: int) -> None:
    """The properties of :func:`check_generator` on discrete codes."""
    from ..blocks.rng import RowRNG
    from ..blocks.sampling import SamplerChain
    from ..contract.interfaces import Known
    from ..contract.registry import build_component

    _, st = _hypothesis()

    def make(tok_name: str, tok_opts: dict) -> tuple[Any, Any]:
        # the kit's own pixel layouts come from the built-in plugin; a caller's tokenizer from `registry`
        source = registry if tokenizer is not None else kit
        tok = build_component(source, "tokenizer", tok_name, dict(tok_opts), path="tokenizer")
        gen = build_component(registry, "generator", name, {**config, "tokenizer": tok}, path="generator")
        return tok, gen

    def pixel_layout(gh: int, gw: int, depth3: bool) -> tuple[str, dict]:
        return ("pixel", {"bits": 1, "pool": 2, "per_channel": depth3, "image_shape": (3, 2 * gh, 2 * gw)})

    def chain(kind: int) -> SamplerChain:
        build = lambda n, **kw: build_component(kit, "sampler", n, kw, path="sampler")
        return SamplerChain([[], [build("top-k", k=3)], [build("cfg", scale=2.0), build("temperature", t=0.9)]][kind])

    @_settings(max_examples)
    @_given(gh=st.integers(1, 4), gw=st.integers(1, 4), depth3=st.booleans(), seed=st.integers(0, 2**16),
           pos=st.sampled_from(["learned", "rope2d"]), kind=st.integers(0, 2))
    def properties(gh: int, gw: int, depth3: bool, seed: int, pos: str, kind: int) -> None:
        tok, gen = make(*(tokenizer or pixel_layout(gh, gw, depth3)))
        L, V = tok.layout.length, tok.vocab_size
        spec = gen.model_spec()
        assert spec.seq_len >= 1 and spec.vocab_size >= V and spec.heads, f"{name}: malformed model_spec {spec}"
        g = torch.Generator().manual_seed(seed)
        B = 4
        codes = torch.randint(0, V, (B, L), generator=g)
        cond = torch.randint(0, 3, (B,), generator=g)
        model = _tiny_model(spec, pos=pos, seed=seed)
        _attach_tiny_auxiliary(gen, spec, pos=pos, seed=seed)

        # the teacher-forcing batch
        batch = _seeded_batch(gen, codes, cond, seed)
        T = batch.inputs.shape[1]
        assert T <= spec.seq_len, f"{name}: training sequence {T} longer than spec.seq_len {spec.seq_len}"
        assert batch.targets.shape[:2] == (B, T) and batch.loss_mask.shape[:2] == (B, T), (
            f"{name}: targets/loss_mask must be [B, T] like inputs {tuple(batch.inputs.shape)}")
        assert batch.loss_mask.dtype == torch.bool and batch.loss_mask.any(), f"{name}: empty or non-bool loss_mask"
        tm = batch.targets[batch.loss_mask]
        assert tm.min() >= 0 and tm.max() < max(spec.heads), f"{name}: targets outside the head vocabulary"
        if spec.input_kind == "tokens":
            assert batch.inputs.min() >= 0 and batch.inputs.max() < spec.vocab_size, f"{name}: input ids out of range"

        # no leak: the logits that predict code j do not see code j
        j = int(torch.randint(0, L, (1,), generator=g))
        other = codes.clone()
        other[:, j] = (codes[:, j] + 1 + torch.randint(0, max(V - 1, 1), (B,), generator=g)) % V
        batch2 = _seeded_batch(gen, other, cond, seed)
        assert torch.equal(batch.loss_mask, batch2.loss_mask), f"{name}: loss_mask depends on the code values"
        changed = (batch.targets != batch2.targets) & batch.loss_mask
        if changed.dim() == 2:
            changed = changed[..., None]  # (B, T, 1): the one head
        if changed.any():  # per head: a head may see code j when another head at the same index predicts it
            a, b = _logits_of(model, batch), _logits_of(model, batch2)  # (B, T, n_heads, V)
            diff = (a - b).abs()[changed].max().item()
            assert diff <= 1e-5, (
                f"{name}: the training mask leaks: changing code {j} changes the logits that predict it by {diff:.3g}")

        # generation: shapes, NFE, determinism, batch independence
        sampler = chain(kind)
        sampler.bind(SamplerContext(vocab_size=V, code_embeddings=tok.code_embeddings(),
                                    token_embeddings=model.token_embeddings()))
        model.reset()
        out = gen.generate(model, sampler, cond, rng=RowRNG(seed, torch.arange(B)))
        assert isinstance(out, torch.Tensor) and out.dtype == torch.long and tuple(out.shape) == (B, L), (
            f"{name}: generate must return LongTensor[{B}, {L}], got {getattr(out, 'dtype', None)} "
            f"{tuple(getattr(out, 'shape', ()))}")
        assert out.min() >= 0 and out.max() < V, f"{name}: generated codes outside [0, {V})"
        expected = gen.expected_nfe()
        if expected is not None:
            assert model.nfe == expected, f"{name}: {model.nfe} forward passes, expected_nfe() says {expected}"
        again = gen.generate(model, sampler, cond, rng=RowRNG(seed, torch.arange(B)))
        assert torch.equal(out, again), f"{name}: the same seed gave different codes"
        i = int(torch.randint(0, B, (1,), generator=g))
        alone = gen.generate(model, sampler, cond[i : i + 1], rng=RowRNG(seed, [i]))
        assert torch.equal(alone[0], out[i]), f"{name}: image {i} differs when generated alone vs in a batch"

        if getattr(gen, "supports_known", False):
            mask = torch.rand(B, L, generator=g) < 0.5
            got = gen.generate(model, sampler, cond, rng=RowRNG(seed, torch.arange(B)), known=Known(codes, mask))
            assert torch.equal(got[mask], codes[mask]), f"{name}: inpainting changed a known token"

        if getattr(gen, "exact_likelihood", False):
            ll = gen.log_likelihood(model, codes, cond)
            assert tuple(ll.shape) == (B,) and torch.isfinite(ll).all() and (ll <= 1e-4).all(), (
                f"{name}: log_likelihood must be finite log-probabilities [B], got {ll}")

    properties()

    if getattr(cls, "exact_likelihood", False) and getattr(cls, "samples_follow_likelihood", True):
        # a tiny enumerable layout (V = 2, L = 4: 16 sequences) unless the caller fixed the tokenizer
        tok, gen = make(*(tokenizer or ("pixel", {"bits": 1, "image_shape": (1, 2, 2)})))
        _likelihood_properties(name, gen, tok, seed=1, n_samples=n_samples)


# ---------------------------------------------------------------------------
# continuous tokens
# ---------------------------------------------------------------------------

#: The heads the kit decodes continuous tokens with (tiny, few steps), as ``(name, options)``.
KIT_HEADS = {"diffusion": {"width": 16, "depth": 1, "num_timesteps": 20},
             "flow": {"width": 16, "depth": 1}}


def _tiny_continuous_model(spec: Any, head: str, steps: int, *, pos: str, seed: int) -> Any:
    """A tiny untrained backbone (``d_model = 16``) with the kit's ``head`` drawing in ``steps``
    steps; the head's weights are perturbed (MAR's denoiser starts at zero output, which would
    ignore the hidden states) so that what the generator feeds it shows in the draws."""
    from ..backbone.instrumented import InstrumentedModel
    from ..backbone.model import build_model
    from ..contract.config import ModelConfig
    from ..contract.registry import build_component

    opts = {**KIT_HEADS[head], ("sampling_steps" if head == "diffusion" else "steps"): steps,
            "hidden_dim": 16, "token_dim": spec.token_dim}
    built = build_component(_kit_registry(), "head", head, opts, path=f"head.{head}")
    g = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        for p in built.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        # one training-mode loss on unit-scale targets, as a trained head has seen (the diffusion head
        # clips x̂0 to the range of the targets it saw: untrained, its samples reach |x| ~ 1e3)
        torch.manual_seed(seed)
        built.train()
        built.loss(torch.randn(16, 16, generator=g), 2.0 * torch.rand(16, spec.token_dim, generator=g) - 1.0)
        built.eval()
    model = build_model(spec, ModelConfig(n_layer=2, d_model=16, n_head=2, pos=pos), n_classes=3, seed=seed,
                        head=built)
    return InstrumentedModel(model.eval())


def _hidden_of(model: Any, batch: Any) -> torch.Tensor:
    return model(batch.inputs, batch.cond, positions=batch.positions, attn_mask=batch.attn_mask,
                 target_positions=batch.extra.get("target_positions"), return_hidden=True).float()


def _continuous_properties(name: str, *, registry: Any, config: dict, given: tuple[str, dict] | None,
                           layout: Any, max_examples: int) -> None:
    """A ``continuous_ok`` generator on continuous tokens (``FloatTensor[B, L, D]``), with a tiny
    backbone whose ``diffusion`` or ``flow`` head draws the tokens in 1–3 steps:

    - the spec is continuous (``token_dim = D``, ``input_kind = "embeddings"``); the
      teacher-forcing batch has float inputs ``[B, T, input_dim]``, float targets ``[B, T, D]``
      that are the image's latents where ``loss_mask`` (bool ``[B, T]``, not empty) is set, and no
      leak: changing latent j leaves the hidden states that predict it unchanged (fp32, 1e-5);
    - ``generate`` returns finite ``float32 [B, L, D]``; the backbone passes equal
      ``expected_nfe()``; core counts each token drawn once by the head (``head_tokens = B·L``,
      ``head_evals = B·L·steps``, twice that with guidance) and at most one head draw per backbone
      pass (``head_steps = steps · draws``, ``1 ≤ draws ≤ NFE``);
    - the same seed gives the same latents, and image i is the same in a batch of 1 and of 3;
    - the null rows of a ``cfg`` chain at scale 1 change nothing (guidance 1 is no guidance); a
      guided chain (``cfg`` 2 + ``temperature``) keeps the NFE (one batched pass for both rows);
    - with ``supports_known``, every known latent is kept exactly; known latents with NaN or
      integer codes are an InputError;
    - ``log_likelihood`` with a head that has no exact likelihood is refused (an error) or None;
    - NaN latents, latents of the wrong width and integer codes handed to ``training_batch`` are a
      clear :class:`~tokenloom.InputError`.
    """
    from ..blocks.rng import RowRNG
    from ..blocks.sampling import SamplerChain
    from ..contract.interfaces import Known
    from ..contract.registry import build_component

    _, st = _hypothesis()
    kit = _kit_registry()
    if given is None and layout is not None:
        given = continuous_layout_for(layout)
        if given is None:
            raise AssertionError(f"{name}: the kit has no continuous tokenizer with the layout {layout}: pass "
                                 "continuous_tokenizer=(name, options)")
        source = kit
    else:
        source = registry if given is not None else kit

    def make(tok: tuple[str, dict]) -> tuple[Any, Any]:
        t = build_component(source, "tokenizer", tok[0], dict(tok[1]), path="tokenizer")
        assert getattr(t, "continuous", False), f"{name}: the continuous check's tokenizer {tok[0]} is discrete"
        return t, build_component(registry, "generator", name, {**config, "tokenizer": t}, path="generator")

    def chain(*specs: tuple[str, dict]) -> SamplerChain:
        return SamplerChain([build_component(kit, "sampler", n, kw, path="sampler") for n, kw in specs])

    # an option that by contract needs codes (e.g. masked's style = "maskgit") makes this configuration
    # discrete-only: skipped when the generator takes the same continuous tokenizer at its defaults
    first = given or ("patch", {"patch": 1, "image_shape": (2, 2, 2)})
    t = build_component(source, "tokenizer", first[0], dict(first[1]), path="tokenizer")
    try:
        build_component(registry, "generator", name, {**config, "tokenizer": t}, path="generator")
    except ConfigError:
        try:
            build_component(registry, "generator", name, {"tokenizer": t}, path="generator")
        except ConfigError as exc2:
            raise AssertionError(f"{name} declares continuous_ok but refuses the continuous tokenizer "
                                 f"{first[0]} {first[1]} at its defaults: {exc2}") from exc2
        if config:
            return  # this configuration alone is discrete-only
        raise  # pragma: no cover - the same build cannot both fail and succeed

    @_settings(max_examples, shrink=False)
    @_given(gh=st.integers(1, 4), gw=st.integers(1, 4), D=st.integers(1, 3), seed=st.integers(0, 2**16),
            pos=st.sampled_from(["learned", "rope2d"]), head=st.sampled_from(sorted(KIT_HEADS)),
            steps=st.integers(1, 3), guided=st.booleans())
    def properties(gh: int, gw: int, D: int, seed: int, pos: str, head: str, steps: int, guided: bool) -> None:
        tok, gen = make(given or ("patch", {"patch": 1, "image_shape": (D, gh, gw)}))
        L, D = tok.layout.length, int(tok.token_dim)
        spec = gen.model_spec()
        assert getattr(spec, "token_dim", 0) == D and spec.input_kind == "embeddings", (
            f"{name}: on continuous tokens (D = {D}) the spec must have token_dim = {D} and input_kind "
            f"'embeddings', got token_dim {getattr(spec, 'token_dim', None)}, {spec.input_kind!r}")
        g = torch.Generator().manual_seed(seed)
        B = 3
        latents = torch.randn(B, L, D, generator=g)
        cond = torch.randint(0, 3, (B,), generator=g)

        # the teacher-forcing batch: float targets [B, T, D] that are the image's latents
        batch = _seeded_batch(gen, latents, cond, seed)
        T = batch.inputs.shape[1]
        assert T <= spec.seq_len, f"{name}: training sequence {T} longer than spec.seq_len {spec.seq_len}"
        assert batch.inputs.dtype.is_floating_point and tuple(batch.inputs.shape) == (B, T, spec.input_dim), (
            f"{name}: continuous inputs must be float [B, T, input_dim = {spec.input_dim}], got "
            f"{batch.inputs.dtype} {tuple(batch.inputs.shape)}")
        tg = batch.targets
        assert tg.dtype.is_floating_point and tuple(tg.shape) == (B, T, D), (
            f"{name}: continuous targets must be float [B, T, D] = [{B}, {T}, {D}], got {tg.dtype} "
            f"{tuple(tg.shape)}")
        assert batch.loss_mask.dtype == torch.bool and tuple(batch.loss_mask.shape) == (B, T), (
            f"{name}: loss_mask must be bool [B, T], got {batch.loss_mask.dtype} {tuple(batch.loss_mask.shape)}")
        assert batch.loss_mask.any(), f"{name}: empty loss_mask"
        for b in range(B):
            rows = tg[b][batch.loss_mask[b]]
            hit = (rows[:, None, :] == latents[b][None]).all(-1).any(-1)
            assert hit.all(), f"{name}: a target under loss_mask (image {b}) is not one of the image's latents"

        # no leak: the hidden states that predict latent j do not see latent j
        model = _tiny_continuous_model(spec, head, steps, pos=pos, seed=seed)
        j = int(torch.randint(0, L, (1,), generator=g))
        other = latents.clone()
        other[:, j] += 1.0 + torch.rand(B, D, generator=g)
        batch2 = _seeded_batch(gen, other, cond, seed)
        assert torch.equal(batch.loss_mask, batch2.loss_mask), f"{name}: loss_mask depends on the latent values"
        changed = ((batch.targets != batch2.targets).any(-1)) & batch.loss_mask
        if changed.any():
            with torch.no_grad():
                diff = (_hidden_of(model, batch) - _hidden_of(model, batch2)).abs()[changed].max().item()
            assert diff <= 1e-5, (f"{name}: the training mask leaks: changing latent {j} changes the hidden "
                                  f"states that predict it by {diff:.3g}")

        # generation: shape, dtype, NFE, head counts
        hs = model.head.steps
        model.reset()
        with torch.no_grad():
            out = gen.generate(model, chain(), cond, rng=RowRNG(seed, torch.arange(B)))
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and tuple(out.shape) == (B, L, D), (
            f"{name}: generate must return FloatTensor[{B}, {L}, {D}] (float32) on continuous tokens, got "
            f"{getattr(out, 'dtype', None)} {tuple(getattr(out, 'shape', ()))}")
        assert torch.isfinite(out).all(), f"{name}: generated latents are not finite"
        expected = gen.expected_nfe()
        if expected is not None:
            assert model.nfe == expected, f"{name}: {model.nfe} forward passes, expected_nfe() says {expected}"
        assert model.head_tokens == B * L, (
            f"{name}: the head drew {model.head_tokens} tokens for {B} images of {L} — each token must be "
            f"drawn once ({B * L})")
        assert model.head_evals == B * L * hs, f"{name}: head evaluations {model.head_evals} != B·L·steps"
        draws, rest = divmod(model.head_steps, hs)
        assert rest == 0 and 1 <= draws <= model.nfe, (
            f"{name}: core counted {model.head_steps} sequential head steps ({hs} per draw) over {model.nfe} "
            "backbone passes — the head draws at most once per pass, each draw counted once")

        # determinism and batch independence
        with torch.no_grad():
            again = gen.generate(model, chain(), cond, rng=RowRNG(seed, torch.arange(B)))
            i = 1 + int(torch.randint(0, B - 1, (1,), generator=g))
            alone = gen.generate(model, chain(), cond[i : i + 1], rng=RowRNG(seed, [i]))
        assert torch.equal(out, again), f"{name}: the same seed gave different latents"
        # fp32 noise of batch-shaped kernels, grown by the untrained head's large gains: relative to the scale
        tol = 1e-4 * (1.0 + out.abs().max().item())
        assert (alone[0] - out[i]).abs().max().item() <= tol, (
            f"{name}: image {i} differs when generated alone vs in a batch of {B} (max diff "
            f"{(alone[0] - out[i]).abs().max().item():.3g})")

        # guidance: the null rows at scale 1 change nothing; a guided chain keeps the NFE
        model.reset()
        with torch.no_grad():
            null = gen.generate(model, chain(("cfg", {"scale": 1.0})), cond, rng=RowRNG(seed, torch.arange(B)))
        assert (null - out).abs().max().item() <= tol, (
            f"{name}: running the null-class rows of cfg at scale 1 changed the conditional latents (max diff "
            f"{(null - out).abs().max().item():.3g}) — guidance 1 is no guidance")
        if expected is not None:
            assert model.nfe == expected, f"{name}: {model.nfe} passes with guidance rows, expected {expected}"
        if guided:
            model.reset()
            with torch.no_grad():
                gout = gen.generate(model, chain(("cfg", {"scale": 2.0}), ("temperature", {"t": 0.9})), cond,
                                    rng=RowRNG(seed, torch.arange(B)))
            assert tuple(gout.shape) == (B, L, D) and torch.isfinite(gout).all(), \
                f"{name}: guided generation gave {tuple(gout.shape)} or non-finite latents"
            if expected is not None:
                assert model.nfe == expected, f"{name}: {model.nfe} passes with guidance, expected {expected}"
            assert model.head_tokens == B * L and model.head_evals == 2 * B * L * hs, (
                f"{name}: with guidance at 2 the head must draw each token once ({B * L}) with the null rows "
                f"evaluated too ({2 * B * L * hs} evaluations), got {model.head_tokens}, {model.head_evals}")

        # known latents
        if getattr(gen, "supports_known", False):
            mask = torch.rand(B, L, generator=g) < 0.5
            with torch.no_grad():
                got = gen.generate(model, chain(), cond, rng=RowRNG(seed, torch.arange(B)),
                                   known=Known(latents, mask))
            assert tuple(got.shape) == (B, L, D) and torch.isfinite(got).all(), \
                f"{name}: generation with known latents gave {tuple(got.shape)} or non-finite latents"
            assert torch.equal(got[mask], latents[mask]), f"{name}: inpainting changed a known latent"
            bad = latents.clone()
            bad[0, 0, 0] = float("nan")
            full = torch.ones(B, L, dtype=torch.bool)
            _expect_error(f"{name}: known latents with NaN", lambda: gen.generate(
                model, chain(), cond, rng=RowRNG(seed, torch.arange(B)), known=Known(bad, full)))
            _expect_error(f"{name}: integer codes as known latents", lambda: gen.generate(
                model, chain(), cond, rng=RowRNG(seed, torch.arange(B)),
                known=Known(torch.zeros(B, L, dtype=torch.long), full)))

        # no exact likelihood from a head without one
        try:
            with torch.no_grad():
                ll = gen.log_likelihood(model, latents, cond)
        except (TokenloomError, NotImplementedError):
            ll = None
        assert ll is None, (f"{name}: log_likelihood with a {head} head (no exact likelihood) returned {ll} — it "
                            "must be refused (an error) or None, never made up")

        # bad input
        nan = latents.clone()
        nan[B - 1, L - 1, 0] = float("nan")
        _expect_error(f"{name}: NaN latents to training_batch", lambda: gen.training_batch(nan, cond))
        _expect_error(f"{name}: latents of width {D + 1} (D = {D}) to training_batch",
                      lambda: gen.training_batch(torch.randn(B, L, D + 1, generator=g), cond))
        _expect_error(f"{name}: integer codes to a continuous order",
                      lambda: gen.training_batch(torch.zeros(B, L, dtype=torch.long), cond))

    properties()
