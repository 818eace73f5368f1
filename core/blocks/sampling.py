"""The sampler chain and the final draw.

A run's samplers form a :class:`SamplerChain`: processors applied in the
configured order (the common convention is guidance -> temperature -> top-k
-> top-p -> min-p -> typical), then core's final draw — argmax when a
processor is ``greedy``, otherwise a categorical draw from the processed
logits with the run's :class:`~tokenloom.rng.RowRNG`. At most one
acceptance rule (speculative decoding) sits in a chain; it does not change
logits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs
import torch

from ..contract.errors import ConfigError
from ..contract.interfaces import AcceptanceRule, Sampler, SamplerContext, StepInfo, check_logits
from .rng import RowRNG


class SamplerChain:
    """An ordered list of processors plus at most one acceptance rule: what
    every generator receives (it satisfies :class:`tokenloom.Chain`)."""

    def __init__(self, samplers: Iterable[Sampler] = ()):
        self.samplers: list[Sampler] = list(samplers)
        rules = [s for s in self.samplers if s.role == "acceptance"]
        if len(rules) > 1:
            names = ", ".join(type(r).__name__ for r in rules)
            raise ConfigError([f"sampler: a chain holds at most one acceptance rule, got {names}"])
        self.acceptance: AcceptanceRule | None = rules[0] if rules else None  # type: ignore[assignment]
        self.processors: list[Sampler] = [s for s in self.samplers if s.role != "acceptance"]

    @property
    def needs_uncond(self) -> bool:
        """Whether the generator must supply ``info.uncond_logits`` (CFG)."""
        return any(s.needs_uncond for s in self.processors)

    @property
    def greedy(self) -> bool:
        return any(s.greedy for s in self.processors)

    @property
    def depends_on_step(self) -> bool:
        """Whether any processor reads the step (see ``Sampler.depends_on_step``)."""
        return any(s.depends_on_step() for s in self.processors)

    def bind(self, context: SamplerContext) -> None:
        for s in self.samplers:
            s.bind(context)

    def __call__(self, logits: torch.Tensor, info: StepInfo | None = None) -> torch.Tensor:
        """The same as :meth:`process`."""
        return self.process(logits, info)

    def process(self, logits: torch.Tensor, info: StepInfo | None = None) -> torch.Tensor:
        """Processed logits ``[B, V]`` (``[B, k, V]`` is flattened and restored)."""
        info = info if info is not None else StepInfo()
        shape = logits.shape
        if logits.dim() == 3:
            logits = logits.reshape(-1, shape[-1])
            if info.uncond_logits is not None and info.uncond_logits.dim() == 3:
                info = attrs.evolve(info, uncond_logits=info.uncond_logits.reshape(-1, shape[-1]))
        check_logits(logits, info)
        for s in self.processors:
            logits = s(logits, info)
        return logits.reshape(shape)

    def probs(self, logits: torch.Tensor, info: StepInfo | None = None) -> torch.Tensor:
        """The processed distribution (one-hot at the argmax when greedy)."""
        out = self(logits, info)
        if self.greedy:
            return torch.nn.functional.one_hot(out.argmax(-1), out.shape[-1]).to(torch.float32)
        return torch.softmax(out.float(), dim=-1)

    def draw(self, processed: torch.Tensor, rng: RowRNG, step: int, *, stream: int = 0) -> torch.Tensor:
        """Core's final draw from already processed logits."""
        if self.greedy:
            return processed.argmax(-1)
        return rng.categorical(processed, step, stream=stream)

    def sample(self, logits: torch.Tensor, info: StepInfo, rng: RowRNG, *, stream: int = 0) -> torch.Tensor:
        """Process ``logits`` ([B, V] or [B, k, V]) and draw one token per row."""
        return self.draw(self(logits, info), rng, info.step, stream=stream)


def continuous_settings(chain: SamplerChain, info: StepInfo | None = None) -> tuple[float, float]:
    """``(guidance, temperature)`` of the chain for a continuous head at step
    ``info``: the product of what each processor's
    :meth:`~tokenloom.interfaces.Sampler.continuous_setting` says (``cfg``:
    its scale under its schedule; ``temperature``: t). A processor that does
    not declare ``continuous_ok`` is a ConfigError naming it (the
    composition check refuses such chains before anything runs)."""
    info = info if info is not None else StepInfo()
    guidance, temperature = 1.0, 1.0
    for s in chain.processors:
        if not getattr(s, "continuous_ok", False):
            raise ConfigError([(f"sampler: {type(s).__name__} does not apply to continuous tokens (a continuous "
                               "head takes only guidance, 'cfg', and 'temperature')")])
        setting = s.continuous_setting(info)
        guidance *= float(setting.get("guidance", 1.0))
        temperature *= float(setting.get("temperature", 1.0))
    return guidance, temperature


def draw_continuous(model, chain: SamplerChain, hidden: torch.Tensor, rng, *, info: StepInfo | None = None,
                    uncond_hidden: torch.Tensor | None = None, stream: int = 0) -> torch.Tensor:
    """The one draw of continuous tokens every decoding loop uses: the run's
    head (``model.sample_head``, counted as head steps by the instrumented
    backbone) draws ``FloatTensor[B, D]`` (``[B, k, D]``) from the hidden
    states ``hidden`` ``[B, C]`` (``[B, k, C]``) of the conditional rows,
    with the chain's guidance and temperature at ``info``
    (:func:`continuous_settings`; ``info.progress`` drives the ``cfg``
    schedules, e.g. MAR's linear ramp over decoded tokens) and ``rng`` at
    ``(info.step, stream)``. ``uncond_hidden``: the null rows' states (same
    shape), required when ``chain.needs_uncond``; skipped at a step whose
    guidance is exactly 1 (``c`` itself: no null rows evaluated). ``model``:
    a :class:`~tokenloom.interfaces.Backbone`, or a bare transformer with a
    ``token_head`` (uncounted)."""
    from ..contract.errors import InputError

    info = info if info is not None else StepInfo()
    guidance, temperature = continuous_settings(chain, info)
    if chain.needs_uncond and uncond_hidden is None:
        raise InputError(f"step {info.step}: the chain guides (cfg) but no unconditional hidden states were "
                         "given (run the null-condition rows and pass uncond_hidden)")
    uncond = uncond_hidden if chain.needs_uncond and guidance != 1.0 else None
    kw = {"rng": rng, "step": info.step, "stream": stream, "temperature": temperature,
          "guidance": guidance if uncond is not None else 1.0, "uncond": uncond}
    if hasattr(model, "sample_head"):
        return model.sample_head(hidden, **kw)
    head = getattr(model, "token_head", None)
    if head is None:
        raise InputError("draw_continuous: the model has no continuous head")
    with torch.no_grad():
        return head.sample(hidden, **kw)


def build_chain(configs: Sequence[object] = (), *, registry=None) -> SamplerChain:
    """Build a chain from :class:`~tokenloom.config.ComponentConfig` entries."""
    from ..contract.registry import build_component, get_registry

    registry = registry or get_registry()
    samplers = [
        build_component(registry, "sampler", c.name, dict(c.options), path=f"sampler[{i}]")
        for i, c in enumerate(configs)
    ]
    return SamplerChain(samplers)


def mass_ranked_before(probs: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """For every entry ``j`` of each row, the total probability of the entries
    ranked strictly before it, where a smaller ``key`` ranks first and equal
    keys tie (so the result does not depend on how ties are ordered).

    The building block of nucleus-style filters: "keep the smallest set, in
    order of ``key``, whose mass reaches ``m``" is ``mass_ranked_before < m``.
    ``probs`` and ``key`` are ``[B, V]``; computed in float64.
    """
    probs = probs.double()
    skey, order = key.double().sort(dim=-1, stable=True)
    sp = probs.gather(-1, order)
    excl = torch.cat([torch.zeros_like(sp[..., :1]), torch.cumsum(sp, dim=-1)[..., :-1]], dim=-1)
    idx = torch.arange(sp.shape[-1], device=sp.device).expand_as(sp)
    new_group = torch.ones_like(skey, dtype=torch.bool)
    new_group[..., 1:] = skey[..., 1:] != skey[..., :-1]
    start = torch.where(new_group, idx, torch.zeros_like(idx)).cummax(dim=-1).values
    before_sorted = excl.gather(-1, start)
    return torch.empty_like(before_sorted).scatter_(-1, order, before_sorted)


def mass_ranked_from(probs: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """For every entry ``j`` of each row, the total probability of the entries
    ranked at or after it — ``key >= key[j]``, so ``j`` and every entry tied
    with it count — summed from the last-ranked end (the small terms first, so
    a tail of tiny probabilities does not vanish in rounding as it does in
    ``1 - mass_ranked_before``). Hugging Face's ``TopPLogitsWarper`` removes an
    entry iff this mass is ``<= 1 - p``. ``[B, V]``; computed in float64.
    """
    probs = probs.double()
    skey, order = key.double().sort(dim=-1, descending=True, stable=True)
    sp = probs.gather(-1, order)
    incl = torch.cumsum(sp, dim=-1)  # last-ranked first
    V = sp.shape[-1]
    idx = torch.arange(V, device=sp.device).expand_as(sp)
    group_end = torch.ones_like(skey, dtype=torch.bool)  # the last index of each run of equal keys
    group_end[..., :-1] = skey[..., 1:] != skey[..., :-1]
    end = torch.where(group_end, idx, torch.full_like(idx, V - 1)).flip(-1).cummin(dim=-1).values.flip(-1)
    from_sorted = incl.gather(-1, end)
    return torch.empty_like(from_sorted).scatter_(-1, order, from_sorted)


def filter_logits(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """A new tensor with the entries outside ``keep`` at ``-inf`` (never
    modifies ``logits``); entries already at ``-inf`` stay there."""
    return logits.masked_fill(~keep, float("-inf"))


class ExactRule(AcceptanceRule):
    """Exact speculative acceptance (Leviathan, Kalman & Matias 2023; Chen et
    al. 2023): a drafted ``x ~ q`` is accepted when ``u < min(1, p(x)/q(x))``,
    and a rejection resamples from ``norm(max(p - q, 0))``
    (:func:`speculative_residual`), so the output is distributed exactly as
    ``p``. The rule of a chain without an acceptance rule
    (:func:`tokenloom.speculative.acceptance_rule`); the ``exact`` sampler
    plugin registers it by name."""

    @attrs.frozen
    class Config:
        pass

    def __init__(self, config: Config | None = None):
        super().__init__(config if config is not None else self.Config())

    def accept(self, p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        px = p.gather(-1, drafted[:, None]).squeeze(-1).double()
        qx = q.gather(-1, drafted[:, None]).squeeze(-1).double()
        return u.double() * qx < px  # u < min(1, p/q), without dividing by q

    def residual(self, p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor | None = None) -> torch.Tensor:
        return speculative_residual(p, q)


def speculative_residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``norm(max(p - q, 0))`` row by row — the distribution to resample from
    after a rejection in exact speculative sampling (Leviathan et al. 2023;
    Chen et al. 2023). Rows where ``p <= q`` everywhere (then p == q) return p."""
    r = (p.double() - q.double()).clamp(min=0)
    total = r.sum(-1, keepdim=True)
    out = torch.where(total > 0, r / total.clamp(min=1e-300), p.double())
    return out.to(p.dtype)
