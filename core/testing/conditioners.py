"""Conditioner properties: a prefix of the declared format, deterministic and batch-independent,
a null condition distinct from every real one and usable for guidance, bad inputs refused."""

from __future__ import annotations

from typing import Any

import torch

from ..contract.errors import TokenloomError
from .common import _expect_error

#: Conditions of the kit: shapes-like captions with class labels, and the training set they fit on.
KIT_CAPTIONS = ("a red circle", "two squares, blue and yellow", "three green triangles", "one circle in cyan",
                "2 magenta and red squares", "a yellow triangle")
KIT_CLASSES = ("circle", "square", "triangle")


def kit_conditions() -> list[Any]:
    """The conditions the kit encodes: a label and a caption each (a conditioner reads what it needs)."""
    from ..blocks.data import parse_caption
    from ..contract.interfaces import Condition

    return [Condition(label=KIT_CLASSES.index(parse_caption(c)["class"]), caption=c) for c in KIT_CAPTIONS]


def _rows(prefix: Any, kind: str) -> torch.Tensor:
    return prefix.ids if kind == "tokens" else prefix.embeddings


def check_conditioner(name: str, *, registry: Any = None, **config: Any) -> None:
    """A conditioner, built with ``n_classes = 3`` and fitted on the kit's
    conditions (:func:`kit_conditions`), must: encode N conditions into a
    :class:`~tokenloom.Prefix` of its declared kind, ``P = prefix_len``
    positions, ids in ``[0, prefix_vocab)`` or embeddings of width
    ``prefix_dim`` (finite), a BoolTensor mask whose last position is real;
    be deterministic (twice the same) and batch-independent (a row's prefix
    does not depend on its neighbours, the order or the batch size); give a
    one-row null condition that differs from every real condition's prefix
    and that the backbone accepts as the table's guidance row (a tiny model
    built with it gives different logits for a real and the null row);
    restore what it fitted through ``state``/``load_state`` (a fresh instance
    encodes the same); and refuse bad inputs (a non-Condition, a wrong type)
    with a clear :class:`~tokenloom.InputError`."""
    from ..backbone.model import build_model
    from ..contract.config import ModelConfig
    from ..contract.interfaces import Condition, ModelSpec, Prefix, TokenLayout
    from ..contract.registry import build_component, get_registry

    registry = registry or get_registry()

    def build():
        return build_component(registry, "conditioner", name, {**config, "n_classes": 3,
                                                               "class_names": KIT_CLASSES},
                               path=f"conditioner.{name}")

    cond = build()
    conditions = kit_conditions()
    cond.fit(conditions)
    kind = cond.prefix_kind
    assert kind in ("tokens", "embeddings"), f"{name}: prefix_kind must be 'tokens' or 'embeddings', got {kind!r}"
    P = cond.prefix_len
    assert isinstance(P, int) and P >= 1, f"{name}: prefix_len must be an int >= 1, got {P!r}"

    def valid(prefix: Any, n: int, what: str) -> None:
        assert isinstance(prefix, Prefix), f"{name}: {what} returned {type(prefix).__name__}, expected a Prefix"
        assert prefix.mask.dtype == torch.bool and tuple(prefix.mask.shape) == (n, P), \
            f"{name}: {what}: mask must be BoolTensor[{n}, {P}], got {prefix.mask.dtype} {tuple(prefix.mask.shape)}"
        assert bool(prefix.mask[:, -1].all()), f"{name}: {what}: the last prefix position must be real in every row"
        if kind == "tokens":
            ids = prefix.ids
            assert ids is not None and ids.dtype == torch.long and tuple(ids.shape) == (n, P), \
                f"{name}: {what}: ids must be LongTensor[{n}, {P}]"
            assert ids.numel() == 0 or (int(ids.min()) >= 0 and int(ids.max()) < cond.prefix_vocab), \
                f"{name}: {what}: ids outside [0, prefix_vocab = {cond.prefix_vocab})"
        else:
            emb = prefix.embeddings
            assert emb is not None and emb.dtype.is_floating_point and tuple(emb.shape) == (n, P, cond.prefix_dim), \
                f"{name}: {what}: embeddings must be FloatTensor[{n}, {P}, {cond.prefix_dim}]"
            assert bool(torch.isfinite(emb).all()), f"{name}: {what}: embeddings must be finite"

    full = cond.encode(conditions)
    valid(full, len(conditions), "encode")
    again = cond.encode(conditions)
    assert torch.equal(_rows(full, kind), _rows(again, kind)) and torch.equal(full.mask, again.mask), \
        f"{name}: encoding the same conditions twice gave different prefixes"
    order = [4, 1, 5, 0, 3, 2]
    for part in ([conditions[i] for i in order], conditions[2:3], conditions[:4]):
        got = cond.encode(part)
        want = [conditions.index(c) for c in part]
        assert torch.equal(_rows(got, kind), _rows(full, kind)[want]) and torch.equal(got.mask, full.mask[want]), \
            f"{name}: a condition's prefix depends on its batch (order, neighbours or size)"
    null = cond.null()
    valid(null, 1, "null()")
    for i in range(len(conditions)):
        same = torch.equal(_rows(null, kind)[0], _rows(full, kind)[i]) and torch.equal(null.mask[0], full.mask[i])
        assert not same, f"{name}: the null condition equals the prefix of {conditions[i]}"
    # restored from its state, a fresh instance encodes the same
    fresh = build()
    fresh.load_state(cond.state())
    restored = fresh.encode(conditions)
    assert torch.equal(_rows(restored, kind), _rows(full, kind)), \
        f"{name}: load_state(state()) does not restore the encoding (a run cannot be sampled from again)"
    # the backbone takes the table, and the null row is a usable guidance row
    layout = TokenLayout(scales=((2, 2),))
    spec = ModelSpec(seq_len=5, vocab_size=4, heads=(4,), train_order="kit", layout=layout)
    model = build_model(spec, ModelConfig(n_layer=1, d_model=16, n_head=2), n_classes=len(conditions), seed=0,
                        conditioner=cond, conditions=full).eval()
    x = torch.zeros(2, 5, dtype=torch.long)
    with torch.no_grad():
        out = model(x, torch.tensor([0, model.n_classes]))
    assert model.n_classes == len(conditions), f"{name}: the backbone's null row is not the table's last row"
    assert bool(torch.isfinite(out).all()) and not torch.allclose(out[0], out[1]), \
        f"{name}: the backbone gives the same logits for a real and the null condition"
    # bad inputs: clear errors, never a crash
    _expect_error(f"{name}: encode([42])", lambda: cond.encode([42]))
    _expect_error(f"{name}: encode([Condition(label='x', caption=7)])",
                  lambda: cond.encode([Condition(label="x", caption=7)]))
    try:
        cond.encode([])
    except TokenloomError:
        pass


__all__ = ["KIT_CAPTIONS", "check_conditioner", "kit_conditions"]
