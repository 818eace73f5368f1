"""``caption``: a caption's words as prefix tokens (Parti / unified-token decoder-only models).

A word-level vocabulary is fitted on the training captions (Hugging Face ``tokenizers``:
``WordLevel`` with a lower-casing normaliser and whitespace/punctuation pre-tokenisation — the
optional extra ``pip install 'tokenloom[text]'``). The prefix of a caption is
``P = max_words + 1`` token ids, *left*-padded: ``[PAD ... PAD, w1 ... wn, END]`` — the last
position (``END``, always real) takes sequence index 0, the words come before it; the null
condition is ``[PAD ... PAD, NULL]``.

Bad input, said and never a traceback: a word not in the vocabulary becomes ``[UNK]`` (a
warning names the unknown words, once each); an empty caption is the null condition (a warning
says so); a caption of more than ``max_words`` words is truncated (a warning names the limit).
"""

from __future__ import annotations

import warnings

import attrs
import torch

import tokenloom

PAD, UNK, NULL, END = "[PAD]", "[UNK]", "[NULL]", "[END]"
SPECIALS = (PAD, UNK, NULL, END)


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise tokenloom.ConfigError(
            ["conditioner: 'caption' needs the Hugging Face 'tokenizers' library: pip install 'tokenloom[text]'"]
        ) from None
    return tokenizers


def _empty_vocabulary():
    tk = _tokenizers()
    from tokenizers import normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    tok = tk.Tokenizer(WordLevel({s: i for i, s in enumerate(SPECIALS)}, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


class CaptionConditioner(tokenloom.Conditioner):
    """Captions as word tokens of a vocabulary fitted on the training captions."""

    @attrs.frozen
    class Config:
        #: the longest caption, in words (pre-tokens: punctuation counts); longer ones are truncated
        max_words: int = attrs.field(default=12, validator=attrs.validators.ge(1))
        #: words seen fewer times in the training captions are left out of the vocabulary ([UNK])
        min_count: int = attrs.field(default=1, validator=attrs.validators.ge(1))

    prefix_kind = "tokens"
    needs = frozenset({"caption"})

    def __init__(self, config, *, n_classes: int = 1, class_names: tuple[str, ...] = ()):
        super().__init__(config, n_classes=n_classes, class_names=class_names)
        _tokenizers()  # the missing library is a config error at composition time
        self._vocab = None
        self._said: set[str] = set()

    # -- the vocabulary ------------------------------------------------------

    def fit(self, conditions):
        texts = [self._text(c, i) for i, c in enumerate(conditions)]
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise tokenloom.InputError("caption: the training conditions hold no captions to fit a vocabulary on "
                                       "(does the data set have captions? shapes and folder with metadata.jsonl do)")
        from tokenizers.trainers import WordLevelTrainer

        tok = _empty_vocabulary()
        trainer = WordLevelTrainer(special_tokens=list(SPECIALS), min_frequency=self.config.min_count,
                                   show_progress=False)
        tok.train_from_iterator(sorted(texts), trainer=trainer)  # sorted: the ids do not depend on data order
        self._vocab = tok

    @property
    def vocabulary(self):
        if self._vocab is None:
            raise tokenloom.InputError("caption: the conditioner has no vocabulary yet (call fit(conditions) on the "
                                       "training captions, or load_state)")
        return self._vocab

    @property
    def prefix_len(self) -> int:
        return self.config.max_words + 1

    @property
    def prefix_vocab(self) -> int:
        return self.vocabulary.get_vocab_size()

    def state(self):
        return {"vocabulary": self.vocabulary.to_str()}

    def load_state(self, state):
        try:
            self._vocab = _tokenizers().Tokenizer.from_str(state["vocabulary"])
        except Exception as exc:  # noqa: BLE001 - a missing key, a wrong type, or the library's own error
            raise tokenloom.InputError(f"caption: cannot restore the vocabulary: {exc}") from None

    # -- encoding ------------------------------------------------------------

    @staticmethod
    def _text(c, i: int) -> str:
        if not isinstance(c, tokenloom.Condition):
            raise tokenloom.InputError(f"conditions[{i}]: expected a tokenloom.Condition, got {type(c).__name__}")
        if c.caption is None:
            if c.label is not None:
                raise tokenloom.InputError(
                    f"conditions[{i}]: the 'caption' conditioner reads captions, got only a class label "
                    f"({c.label}); the data set has no captions? (use [conditioner] name = \"class\")")
            return ""
        if not isinstance(c.caption, str):
            raise tokenloom.InputError(f"conditions[{i}].caption: expected a string, got {type(c.caption).__name__}")
        return c.caption

    def encode(self, conditions):
        vocab = self.vocabulary
        P, n_words = self.prefix_len, self.config.max_words
        unk, pad, end = vocab.token_to_id(UNK), vocab.token_to_id(PAD), vocab.token_to_id(END)
        ids = torch.full((len(conditions), P), pad, dtype=torch.long)
        mask = torch.zeros(len(conditions), P, dtype=torch.bool)
        unknown: list[str] = []
        for i, c in enumerate(conditions):
            text = self._text(c, i)
            if c.caption is not None and not text.strip():
                self._say(f"caption: the empty prompt (conditions[{i}]) is the null condition (unconditional)",
                          "<empty>")
            enc = vocab.encode(text)
            words = list(enc.ids)
            unknown += [text[a:b].lower() for (a, b), t in zip(enc.offsets, words) if t == unk]
            if len(words) > n_words:
                self._say(f"caption: {text!r} has {len(words)} words; truncated to max_words = {n_words}",
                          f"<long>{text}")
                words = words[:n_words]
            if not text.strip():
                row = [vocab.token_to_id(NULL)]
            else:
                row = words + [end]
            ids[i, P - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, P - len(row):] = True
        new = sorted(set(unknown) - self._said)
        if new:
            self._say(f"caption: {len(new)} word(s) not in the vocabulary fitted on the training captions, read as "
                      f"{UNK}: {', '.join(new[:12])}{' ...' if len(new) > 12 else ''}", *new)
        return tokenloom.Prefix(mask=mask, ids=ids)

    def _say(self, message: str, *keys: str) -> None:
        if keys and all(k in self._said for k in keys):
            return
        self._said.update(keys)
        warnings.warn(message, stacklevel=3)

    def null(self):
        P = self.prefix_len
        ids = torch.full((1, P), self.vocabulary.token_to_id(PAD), dtype=torch.long)
        ids[0, -1] = self.vocabulary.token_to_id(NULL)
        mask = torch.zeros(1, P, dtype=torch.bool)
        mask[0, -1] = True
        return tokenloom.Prefix(mask=mask, ids=ids)


@tokenloom.hookimpl
def register_conditioners(register):
    register("caption", CaptionConditioner)
