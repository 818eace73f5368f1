"""``text-encoder``: a frozen ``transformers`` text encoder's hidden states as the prefix.

LlamaGen's text-to-image recipe: the caption goes through a frozen encoder (FLAN-T5 there; a
T5 encoder or a CLIP text model here), and its hidden states, projected to the backbone's width
by a trained linear map (the backbone's ``cond_proj``), precede the image tokens. The encoder is
loaded from a **local directory** (``path = ".../flan-t5-small"``, as written by
``save_pretrained``) with ``local_files_only=True`` — never a download — and needs the optional
extra ``pip install 'tokenloom[text]'`` (``transformers``).

The prefix is ``P = max_tokens + 1`` embeddings of the encoder's width, left-padded: the
caption's token states, then (the last position, always real) their mean. The null condition is
zeros with only the last position real. Each caption is encoded on its own (no batch padding),
so a caption's prefix never depends on its neighbours. Bad input: an empty prompt is the null
condition (said); a caption of more than ``max_tokens`` tokens is truncated (a warning names the
limit); a missing directory, or one without a tokenizer or a model, is a ``ConfigError``.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import attrs
import torch

import tokenloom


def _transformers():
    try:
        import transformers
    except ImportError:
        raise tokenloom.ConfigError(
            ["conditioner: 'text-encoder' needs the 'transformers' library: pip install 'tokenloom[text]'"]
        ) from None
    return transformers


def _load(path: Path):
    """The tokenizer and the frozen encoder saved in ``path``."""
    tf = _transformers()
    if not path.is_dir():
        raise tokenloom.ConfigError([(f"conditioner.path: no such directory: {path} (a local copy of a text "
                                     "encoder, as written by save_pretrained; nothing is downloaded)")])
    if not (path / "config.json").is_file():
        raise tokenloom.ConfigError([f"conditioner.path: {path} holds no config.json (not a saved model)"])
    files = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json", "vocab.txt")
    if not any((path / f).is_file() for f in files):
        raise tokenloom.ConfigError([(f"conditioner.path: {path} has no usable tokenizer (none of "
                                     f"{', '.join(files)}; save the tokenizer beside the model)")])
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - the library's errors differ by version and file
        raise tokenloom.ConfigError([(f"conditioner.path: {path} has no usable tokenizer "
                                     f"(tokenizer.json / tokenizer_config.json): {type(exc).__name__}: {exc}")]) from None
    try:
        config = tf.AutoConfig.from_pretrained(str(path), local_files_only=True)
        kind = getattr(config, "model_type", "")
        if kind == "t5" or kind == "mt5" or kind == "umt5":
            model = tf.T5EncoderModel.from_pretrained(str(path), local_files_only=True)
        elif kind in ("clip", "clip_text_model"):
            model = tf.CLIPTextModel.from_pretrained(str(path), local_files_only=True)
        else:
            model = tf.AutoModel.from_pretrained(str(path), local_files_only=True)
            if hasattr(model, "get_encoder"):
                model = model.get_encoder()
    except Exception as exc:  # noqa: BLE001
        raise tokenloom.ConfigError([(f"conditioner.path: cannot load a text encoder from {path}: "
                                     f"{type(exc).__name__}: {exc}")]) from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return tokenizer, model


class TextEncoderConditioner(tokenloom.Conditioner):
    """Captions through a frozen local text encoder (T5 encoder, CLIP text model)."""

    @attrs.frozen
    class Config:
        #: the local directory of the encoder and its tokenizer (save_pretrained); never downloaded
        path: str = attrs.field(validator=attrs.validators.instance_of(str))
        #: the longest caption, in the encoder's tokens; longer ones are truncated
        max_tokens: int = attrs.field(default=16, validator=attrs.validators.ge(1))

    prefix_kind = "embeddings"
    needs = frozenset({"caption"})

    def __init__(self, config, *, n_classes: int = 1, class_names: tuple[str, ...] = ()):
        super().__init__(config, n_classes=n_classes, class_names=class_names)
        self._path = Path(config.path).expanduser()
        tokenizer, encoder = _load(self._path)
        self.tokenizer = tokenizer
        object.__setattr__(self, "_encoder", encoder)  # not a submodule: frozen, never saved with the run
        self._said: set[str] = set()

    @property
    def prefix_len(self) -> int:
        return self.config.max_tokens + 1

    @property
    def prefix_dim(self) -> int:
        return int(self._encoder.config.hidden_size if hasattr(self._encoder.config, "hidden_size")
                   else self._encoder.config.d_model)

    def state(self):
        """The encoder's identity (its directory's config and weight file sizes), so a run's model
        is keyed by the encoder it was trained with."""
        h = hashlib.sha256()
        for f in sorted(self._path.iterdir()):
            if f.is_file():
                h.update(f.name.encode())
                h.update(str(f.stat().st_size).encode())
        return {"encoder": h.hexdigest()[:16]}

    def load_state(self, state):
        if state and state != self.state():
            warnings.warn(f"text-encoder: the encoder in {self._path} differs from the one the model was trained "
                          "with", stacklevel=2)

    def _say(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            warnings.warn(message, stacklevel=3)

    def encode(self, conditions):
        P, D, n_max = self.prefix_len, self.prefix_dim, self.config.max_tokens
        emb = torch.zeros(len(conditions), P, D)
        mask = torch.zeros(len(conditions), P, dtype=torch.bool)
        for i, c in enumerate(conditions):
            if not isinstance(c, tokenloom.Condition):
                raise tokenloom.InputError(f"conditions[{i}]: expected a tokenloom.Condition, got {type(c).__name__}")
            if c.caption is not None and not isinstance(c.caption, str):
                raise tokenloom.InputError(f"conditions[{i}].caption: expected a string, got {type(c.caption).__name__}")
            if c.caption is None and c.label is not None:
                raise tokenloom.InputError(f"conditions[{i}]: the 'text-encoder' conditioner reads captions, got only "
                                           f"a class label ({c.label})")
            text = c.caption or ""
            if not text.strip():
                if c.caption is not None:
                    self._say("<empty>", f"text-encoder: the empty prompt (conditions[{i}]) is the null condition")
                mask[i, -1] = True
                continue
            ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
            if len(ids) > n_max:
                self._say(f"<long>{text}", f"text-encoder: {text!r} has {len(ids)} tokens; truncated to "
                                           f"max_tokens = {n_max}")
                ids = ids[:n_max]
            with torch.no_grad():
                h = self._encoder(input_ids=torch.tensor([ids])).last_hidden_state[0].float()  # (n, D)
            n = h.shape[0]
            emb[i, P - 1 - n : P - 1] = h
            emb[i, -1] = h.mean(0)
            mask[i, P - 1 - n :] = True
        return tokenloom.Prefix(mask=mask, embeddings=emb)

    def null(self):
        mask = torch.zeros(1, self.prefix_len, dtype=torch.bool)
        mask[0, -1] = True
        return tokenloom.Prefix(mask=mask, embeddings=torch.zeros(1, self.prefix_len, self.prefix_dim))


@tokenloom.hookimpl
def register_conditioners(register):
    register("text-encoder", TextEncoderConditioner)
