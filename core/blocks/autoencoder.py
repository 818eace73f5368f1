"""Encoder → quantiser → decoder tokenizers: the shared skeleton.

A learned tokenizer plugin derives from :class:`AutoencoderTokenizer`, gives
its ``Config`` the common fields of :class:`AutoencoderConfig` (by
inheriting it) and implements only its quantiser:

- ``quantize(z)``: ``z`` ``(B, D, h, w)`` from the encoder →
  :class:`QuantOut` (the decoder's input with straight-through gradients, the
  codes ``LongTensor[B, L]`` in the layout's flat order, the quantiser's own
  losses in training mode, statistics);
- ``dequantize(codes)``: ``LongTensor[B, L]`` → the decoder's input;
- ``code_embeddings()``.

A **continuous** tokenizer (MAR's KL autoencoder) derives from
:class:`ContinuousAutoencoderTokenizer` instead and reuses the same skeleton:
its ``quantize(z)`` returns the decoder's input (a posterior draw in training,
the mean in eval mode) as ``QuantOut.latent`` and the deterministic tokens
``FloatTensor[B, L, D]`` as ``QuantOut.codes`` (its KL term as ``loss``);
``dequantize(latents)`` maps tokens back to the decoder's input. The base
class then validates latents with :func:`tokenloom.check_latents` in ``decode``.

The base class builds the :mod:`tokenloom.convnet` encoder and decoder,
validates inputs, clamps decoded images to [-1, 1], and trains with
:func:`tokenloom.tokenizer_train.train_tokenizer` (AdamW on the MSE
reconstruction loss plus the quantiser's losses). All initial weights come
from ``config.seed``, never from the global random state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import attrs
import torch
import torch.nn.functional as F

from ..contract.errors import ConfigError
from ..contract.interfaces import Tokenizer
from .convnet import ARCHITECTURES, DOWNSAMPLE_FACTORS


def _in(*choices: int):
    def check(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in choices:
            raise ValueError(f"'{attribute.name}' must be one of {', '.join(map(str, choices))}, got {value!r}")

    return check


@attrs.frozen
class AutoencoderConfig:
    """Fields every learned tokenizer shares (a plugin's ``Config`` inherits them).

    - ``downsample``: encoder stride (2, 4, 8 or 16; 1 only for tests) — the token
      grid is ``H/downsample × W/downsample``;
    - ``channels``: width of the first encoder level (deeper levels: 2×);
    - ``steps``, ``batch_size``, ``lr``, ``weight_decay``: the training run
      :meth:`~AutoencoderTokenizer.fit` does by default (AdamW, linear warm-up
      then cosine decay to 10 % of ``lr``);
    - ``seed``: initial weights and training batches;
    - ``encoder``: ``"conv"`` (the default: a convolutional encoder and decoder with
      residual blocks, whose codes also depend on the neighbouring patches) or
      ``"patchwise"`` (every code a function of its own ``downsample × downsample``
      pixel patch only, and decoded back to that patch alone:
      :class:`tokenloom.convnet.PatchEncoder`). On 16-px ``shapes`` the images hold
      only 79 distinct 2×2 patches, so a patchwise ``vq`` at downsample 2 with 128
      codes reconstructs every held-out image exactly (oracle 1.000) with one code for
      the background, where the conv encoder spreads it over context-dependent codes
      (docs/recipes.md, issue 18).
    """

    #: options added after cache keys were first written, left out of keys at these defaults
    later_defaults: ClassVar[dict] = {"encoder": "conv"}

    downsample: int = attrs.field(default=4, validator=_in(*DOWNSAMPLE_FACTORS))
    channels: int = attrs.field(default=16, validator=[attrs.validators.ge(4), attrs.validators.le(1024)])
    steps: int = attrs.field(default=1500, validator=attrs.validators.ge(0))
    batch_size: int = attrs.field(default=32, validator=attrs.validators.ge(1))
    lr: float = attrs.field(default=2e-3, validator=attrs.validators.gt(0.0))
    weight_decay: float = attrs.field(default=0.0, validator=attrs.validators.ge(0.0))
    seed: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    encoder: str = attrs.field(default="conv", validator=attrs.validators.in_(tuple(ARCHITECTURES)))


@attrs.define
class QuantOut:
    """What a quantiser returns.

    - ``latent``: the decoder's input ``(B, D', h, w)`` (straight-through in
      training mode);
    - ``codes``: ``LongTensor[B, L]`` in the layout's flat order;
    - ``loss``: the quantiser's own loss (commitment, codebook, entropy), a
      scalar tensor (zero in eval mode or when there is none);
    - ``stats``: floats for the progress bar and the fit report;
    - ``aux_latents``: further decoder inputs whose decoded images are also
      pulled towards the input (FlexVAR's coarse scales), averaged into the
      reconstruction loss.
    """

    latent: torch.Tensor
    codes: torch.Tensor
    loss: torch.Tensor
    stats: dict[str, float] = attrs.Factory(dict)
    aux_latents: list[torch.Tensor] = attrs.Factory(list)


class AutoencoderTokenizer(Tokenizer):
    """Base of the learned tokenizers (see the module docstring)."""

    def __init__(self, config: Any, *, image_shape: tuple[int, int, int], latent_channels: int,
                 decoder_channels: int | None = None):
        super().__init__(config, image_shape=image_shape)
        c, h, w = self.image_shape
        ds = config.downsample
        if h % ds or w % ds:
            raise ConfigError(f"downsample = {ds} does not divide the image size {h}×{w}")
        self.grid = (h // ds, w // ds)
        self.latent_channels = latent_channels
        with self.seeded(0):
            encoder, decoder = ARCHITECTURES[getattr(config, "encoder", "conv")]
            self.encoder = encoder(c, latent_channels, downsample=ds, channels=config.channels)
            self.decoder = decoder(decoder_channels or latent_channels, c, downsample=ds, channels=config.channels)

    @contextlib.contextmanager
    def seeded(self, offset: int = 1) -> Iterator[None]:
        """Run a block (e.g. building the quantiser) with the global torch RNG
        seeded from ``config.seed`` and ``offset``, restoring it afterwards."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.config.seed) * 1000003 + offset)
            yield

    # -- to implement -------------------------------------------------------
    def quantize(self, z: torch.Tensor) -> QuantOut:
        raise NotImplementedError

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, step: int, generator: torch.Generator) -> dict[str, float]:
        """Called after each optimiser step (e.g. dead-code restart); returns stats."""
        return {}

    # -- the contract -------------------------------------------------------
    # image i's codes and pixels must not depend on its batch neighbours (bit
    # for bit), but convolution and matmul kernels pick different blockings
    # for different batch sizes. So the networks always see the same batch
    # size: chunks of CHUNK images, the last one padded with zeros (the
    # kernels treat the rows of one batch alike: an image gives the same bits
    # at any position of a chunk, whatever its neighbours — the conformance
    # kit checks a batch against its images one by one). 3-5x the throughput
    # of one image at a time on a CPU. In training mode (quantiser statistics
    # such as dead-code usage must not count padding) images go one by one.
    CHUNK = 16

    def _per_image(self, fn: Any, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if self.training:
            return fn(x) if n <= 1 else torch.cat([fn(x[i : i + 1]) for i in range(n)])
        if n == 0:
            return fn(x)
        pad = (-n) % self.CHUNK
        if pad:
            x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
        return torch.cat([fn(x[i : i + self.CHUNK]) for i in range(0, x.shape[0], self.CHUNK)])[:n]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        images = self.check_images(images)
        return self._per_image(lambda x: self.quantize(self.encoder(x)).codes, images)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        codes = self.check_codes(codes)
        return self._per_image(lambda c: self.decoder(self.dequantize(c)).clamp(-1.0, 1.0).float(), codes)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """``decode(encode(images))`` without the round trip through codes."""
        images = self.check_images(images)
        return self._per_image(lambda x: self.decoder(self.quantize(self.encoder(x)).latent).clamp(-1.0, 1.0), images)

    def training_loss(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """MSE reconstruction loss plus the quantiser's losses on one batch."""
        q = self.quantize(self.encoder(images))
        rec = F.mse_loss(self.decoder(q.latent), images)
        if q.aux_latents:
            aux = torch.stack([F.mse_loss(self.decoder(a), images) for a in q.aux_latents]).mean()
            rec = 0.5 * (rec + aux)
        loss = rec + q.loss
        return loss, {"loss": float(loss.detach()), "rec": float(rec.detach()), **q.stats}

    def fit(self, images: torch.Tensor, *, steps: int | None = None, progress: bool = True,
            checkpoint: Any = None, checkpoint_every: int = 100) -> dict[str, float]:
        """Train for ``steps`` (default ``config.steps``) AdamW steps on
        ``images``; with ``checkpoint`` (a path) the training state is saved
        atomically every ``checkpoint_every`` steps and a run resumes from it."""
        from .tokenizer_train import train_tokenizer

        cfg = self.config
        return train_tokenizer(
            self, images, steps=cfg.steps if steps is None else steps, batch_size=cfg.batch_size, lr=cfg.lr,
            weight_decay=cfg.weight_decay, seed=cfg.seed, progress=progress, checkpoint=checkpoint,
            checkpoint_every=checkpoint_every,
        )

    def fit_resumable(self, images: torch.Tensor, *, checkpoint: Any, progress: bool = True) -> dict[str, float]:
        """:meth:`fit` with its training state saved to ``checkpoint`` (and resumed from it)."""
        return self.fit(images, progress=progress, checkpoint=checkpoint)


class ContinuousAutoencoderTokenizer(AutoencoderTokenizer):
    """Base of the learned *continuous* tokenizers: the skeleton of
    :class:`AutoencoderTokenizer` (encoder, decoder, chunked batch-independent
    encode/decode, :func:`~tokenloom.tokenizer_train.train_tokenizer`) with
    float tokens ``[B, L, token_dim]`` instead of codes (see the module
    docstring). ``vocab_size`` is 0 and ``code_embeddings()`` raises."""

    continuous = True

    def __init__(self, config: Any, *, image_shape: tuple[int, int, int], latent_channels: int,
                 token_dim: int, decoder_channels: int | None = None):
        super().__init__(config, image_shape=image_shape, latent_channels=latent_channels,
                         decoder_channels=decoder_channels)
        self.token_dim = int(token_dim)
        self.vocab_size = 0

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        latents = self.check_latents(latents)
        return self._per_image(lambda c: self.decoder(self.dequantize(c)).clamp(-1.0, 1.0).float(), latents)

    def code_embeddings(self) -> torch.Tensor:
        raise ConfigError(f"{type(self).__name__} has continuous tokens: there is no codebook "
                          "(code_embeddings() applies to discrete tokenizers only)")


def grid_to_codes(idx: torch.Tensor) -> torch.Tensor:
    """``(B, h, w)`` or ``(B, h, w, D)`` indices -> ``LongTensor[B, L]``
    row-major, depth-minor (the layout's flat order)."""
    return idx.reshape(idx.shape[0], -1).long()


__all__ = ["AutoencoderConfig", "AutoencoderTokenizer", "ContinuousAutoencoderTokenizer", "QuantOut", "grid_to_codes"]
