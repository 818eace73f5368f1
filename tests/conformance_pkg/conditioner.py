"""``letters``: a conditioner written from :mod:`tokenloom.interfaces` alone — a caption as
embeddings of its letters (P = 4: the mean letter vector of each third of the caption, then an
end marker), for ``tests/test_conditioners.py`` to run through the conformance kit."""

from __future__ import annotations

import attrs
import torch

import tokenloom


class Letters(tokenloom.Conditioner):
    prefix_kind = "embeddings"
    needs = frozenset({"caption"})

    @attrs.frozen
    class Config:
        dim: int = attrs.field(default=6, validator=attrs.validators.ge(2))

    def __init__(self, config, *, n_classes=1, class_names=()):
        super().__init__(config, n_classes=n_classes, class_names=class_names)
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(27, config.dim, generator=g)  # a..z, then anything else

    @property
    def prefix_len(self) -> int:
        return 4

    @property
    def prefix_dim(self) -> int:
        return self.config.dim

    def _row(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        idx = [ord(ch) - 97 if "a" <= ch <= "z" else 26 for ch in text.lower()]
        parts = [idx[i * len(idx) // 3 : (i + 1) * len(idx) // 3] for i in range(3)]
        emb = torch.zeros(4, self.config.dim)
        mask = torch.zeros(4, dtype=torch.bool)
        for j, part in enumerate(parts):
            if part:
                emb[j], mask[j] = self.table[part].mean(0), True
        emb[3, 0], mask[3] = 1.0, True  # the end marker
        return emb, mask

    def encode(self, conditions):
        rows = []
        for i, c in enumerate(conditions):
            if not isinstance(c, tokenloom.Condition) or not isinstance(c.caption, (str, type(None))):
                raise tokenloom.InputError(f"conditions[{i}]: expected a Condition with a text caption")
            rows.append(self._row(c.caption or ""))
        if not rows:
            return tokenloom.Prefix(mask=torch.zeros(0, 4, dtype=torch.bool),
                                    embeddings=torch.zeros(0, 4, self.config.dim))
        return tokenloom.Prefix(mask=torch.stack([m for _, m in rows]), embeddings=torch.stack([e for e, _ in rows]))

    def null(self):
        emb = torch.zeros(1, 4, self.config.dim)
        emb[0, 3, 1] = 1.0  # a null marker, not the end marker
        mask = torch.tensor([[False, False, False, True]])
        return tokenloom.Prefix(mask=mask, embeddings=emb)


PLUGIN = type("LettersPlugin", (), {
    "register_conditioners": staticmethod(tokenloom.hookimpl(lambda register: register("letters", Letters))),
})
