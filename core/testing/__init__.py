"""The conformance kit: the plugin contract as properties of shape *and* meaning.

A third party checks their plugin from their own pytest suite::

    import tokenloom.testing

    def test_my_tokenizer_honours_the_contract():
        tokenloom.testing.check("tokenizer", "mytok", bits=3)

``check(kind, name, **config)`` builds the component through the registry
(exactly as a config file would), runs every property for that kind, and
raises ``AssertionError`` describing the first violation. tokenloom's own
test suite runs it over every registered component, so a plugin is tested the
moment it is registered. The kit needs ``hypothesis`` (a development
dependency, ``pip install 'tokenloom[dev]'``); it is imported when a check
runs, not with this module.

What is checked besides shapes, types, determinism and clear errors:

- tokenizers: after a brief fit on the kit's blocky images
  (:func:`blocky_images`), decode(encode(x)) is far closer to x than the best
  constant image (``recon_bound`` × its error); non-square images (H×W/2 and
  H/2×W, where the config allows them) pass the same properties; a
  ``cell_local`` tokenizer lays its grid out along H and W and changing one
  patch changes only the codes of its cell (and those codes decode only to
  that patch);
- samplers: what ``Sampler.transform`` declares — a truncation keeps the
  largest logit and leaves the kept ones unchanged, a rescale multiplies a
  row by a positive number, guidance of identical conditional and
  unconditional logits is the identity; acceptance rules: drafting from q,
  accepting, else resampling from the residual gives exactly p on small
  enumerable cases; a relaxed rule is exact at its ``exact_settings`` and
  never accepts a draft with more probability than the target mass of its
  declared ``neighbourhood``;
- generators with an exact likelihood: the log-probabilities of the drawn
  codes under the logits handed to the sampler chain during decoding equal
  ``log_likelihood`` of the generated codes (one teacher-forced pass), and
  samples of a tiny, peaked model over a tiny layout agree with
  ``exp(log_likelihood)`` by a chi-square test;
- generators that declare ``continuous_ok``: the same properties on continuous tokens (the kit's
  ``patch``/``kl`` latents, a tiny backbone with a ``diffusion`` or ``flow`` head) — float
  targets ``[B, T, D]`` that are the image's latents and no leak, finite ``float32 [B, L, D]``
  draws, NFE, each token drawn once by the head as core counts it, determinism and batch
  independence, ``cfg`` at scale 1 changing nothing, known latents kept, no likelihood made up for
  a head without one, bad latents an :class:`~tokenloom.InputError` (``token_kinds=`` selects the
  kinds, ``continuous_tokenizer=`` fixes the tokenizer);
- metrics: a context providing what ``requires`` names gives a number; a
  context missing a required field is an :class:`~tokenloom.errors.InputError`;
  for keys with a direction (better lower or higher) computed from real
  images against generated or reconstructed ones, identical sets score best
  and a growing distortion moves the score monotonically the wrong way;
- heads: a finite per-token loss whose gradients reach the hidden state, draws of the right
  kind and shape that depend only on (seed, image, step, stream) — the same in any batch —
  guidance of identical rows that changes nothing, the declared steps and FLOPs counted by the
  instrumented backbone apart from the NFE, and the other token kind refused at build time;
- conditioners: a prefix of the declared kind and length, the same for a
  condition whatever its batch (order, neighbours, size), a null condition
  unlike every real one that a backbone built with the conditioner answers
  differently, and ``state``/``load_state`` restoring the encoding.

Keyword arguments besides the component's config:

- ``image_shape=(C, H, W)`` for tokenizers (default ``(3, 16, 16)``);
- ``fit_steps=N``: optimiser steps to fit a trainable tokenizer before the
  shape properties run (default 2: the contract must hold for any weights);
- ``recon_steps=N`` (default 100) and ``recon_bound=r`` (default 0.6): the
  brief fit of the reconstruction property and the bound on the ratio of its
  error to the best constant image's;
- ``max_examples=N``: hypothesis examples per property (default 20);
- ``context=MetricContext(...)`` for metrics (default: :func:`metric_context`,
  small synthetic images, codes and run statistics);
- ``registry=``: the :class:`~tokenloom.registry.Registry` to build the
  component from (default: the process-wide one). The helper components the
  kit builds itself (the ``pixel`` tokenizer of the generator properties,
  the samplers of its chains) always come from tokenloom's own plugins, so
  installed third-party plugins cannot change a check's outcome.
"""

from __future__ import annotations

from typing import Any

from .common import random_images
from .conditioners import check_conditioner, kit_conditions
from .generators import check_generator, chi_square_pvalue
from .heads import check_head
from .metrics import DISTORTIONS, METRIC_REQUIRES, check_metric, metric_context
from .samplers import TRANSFORMS, check_acceptance, check_sampler, logits_strategy
from .tokenizers import blocky_images, check_tokenizer

#: The properties of each kind of component.
CHECKS = {"tokenizer": check_tokenizer, "sampler": check_sampler, "generator": check_generator,
          "metric": check_metric, "conditioner": check_conditioner, "head": check_head}


def check(kind: str, name: str, **config: Any) -> None:
    """Run the conformance properties of ``kind`` on the component ``name``
    built with ``config``; raises ``AssertionError`` on the first violation."""
    from ..contract.registry import Registry

    kind = Registry.check_kind(kind)
    if kind not in CHECKS:
        raise NotImplementedError(f"no conformance properties for kind {kind!r} yet")
    CHECKS[kind](name, **config)


__all__ = [
    "CHECKS",
    "DISTORTIONS",
    "METRIC_REQUIRES",
    "TRANSFORMS",
    "blocky_images",
    "check",
    "check_acceptance",
    "check_conditioner",
    "check_generator",
    "check_head",
    "check_metric",
    "check_sampler",
    "check_tokenizer",
    "chi_square_pvalue",
    "kit_conditions",
    "logits_strategy",
    "metric_context",
    "random_images",
]
