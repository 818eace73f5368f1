"""``class``: the class label as one prefix token (today's class-conditional recipe).

The prefix is P = 1 position: token ``label`` of a vocabulary of ``n_classes + 1`` ids, the
last one (``n_classes``) the *null class* that classifier-free guidance and label dropout use
(LlamaGen §2.3). The backbone embeds it with its own table (``cls_emb``), exactly as it embedded
the class token before conditioners were a plugin kind, so class-conditional runs keep their
numbers bit for bit.
"""

from __future__ import annotations

import attrs
import torch

import tokenloom


class ClassConditioner(tokenloom.Conditioner):
    """One prefix token per image: its class label (``n_classes`` = the null class)."""

    @attrs.frozen
    class Config:
        pass

    prefix_kind = "tokens"
    needs = frozenset({"label"})

    @property
    def prefix_len(self) -> int:
        return 1

    @property
    def prefix_vocab(self) -> int:
        return self.n_classes + 1

    def encode(self, conditions: list[tokenloom.Condition]) -> tokenloom.Prefix:
        ids = []
        for i, c in enumerate(conditions):
            if not isinstance(c, tokenloom.Condition):
                raise tokenloom.InputError(f"conditions[{i}]: expected a tokenloom.Condition, got {type(c).__name__}")
            if c.label is None:
                if c.caption is not None:
                    raise tokenloom.InputError(
                        f"conditions[{i}]: the 'class' conditioner reads class labels, got only a caption "
                        f"({c.caption!r}); use [conditioner] name = \"caption\" for captions")
                ids.append(self.n_classes)  # the null condition
                continue
            label = c.label
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < self.n_classes:
                raise tokenloom.InputError(
                    f"conditions[{i}].label: expected a class id in [0, {self.n_classes}), got {label!r}")
            ids.append(label)
        t = torch.tensor(ids, dtype=torch.long).reshape(-1, 1)
        return tokenloom.Prefix(mask=torch.ones(t.shape, dtype=torch.bool), ids=t)

    def null(self) -> tokenloom.Prefix:
        t = torch.full((1, 1), self.n_classes, dtype=torch.long)
        return tokenloom.Prefix(mask=torch.ones(t.shape, dtype=torch.bool), ids=t)


@tokenloom.hookimpl
def register_conditioners(register):
    register("class", ClassConditioner)
