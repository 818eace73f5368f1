"""``prompt-alignment``: does a generated ``shapes`` image show what its prompt asked for?

GenEval-style (Ghosh et al. 2023), but exact: the data set's own parser
(:func:`tokenloom.data.parse_shapes`, built on :func:`tokenloom.data.shape_regions`) reads the
shapes of each generated image — count, class (fill ratio of the bounding box) and colour — and
:func:`tokenloom.data.parse_caption` reads what the prompt asks for. An image is *aligned* when
every attribute its prompt names matches:

- ``count``: exactly the number of shapes asked for;
- ``class``: at least one shape, all of the class asked for;
- ``colours``: the shapes' colours are exactly the multiset asked for.

Values: ``prompt_alignment`` (the fraction of aligned images) and each attribute's rate
(``prompt_count_ok``, ``prompt_class_ok``, ``prompt_colour_ok``) over the images whose prompt
names it. Two ceilings, when the data set has captions: ``prompt_alignment_real`` (the held-out
images against their own captions: what the parser can read at this size) and
``prompt_alignment_reconstructed`` (their tokenizer reconstructions: what the tokenizer lets
through). With ``[data] holdout_combos`` (combinations never trained on),
``prompt_alignment_unseen`` scores the prompts that ask for one of them and
``prompt_alignment_seen`` the others: compositional generalisation. A class-conditional run's prompt is its class (only ``class`` is asked). Prompts that
name no shape class are left out (``n_unparsed`` in the eval card). On other data sets, or
without prompts or classes, every value is None (the card says why).
"""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np

import tokenloom

_KEYS = ("prompt_alignment", "prompt_count_ok", "prompt_class_ok", "prompt_colour_ok", "prompt_alignment_real",
         "prompt_alignment_reconstructed", "prompt_alignment_seen", "prompt_alignment_unseen")


def parse_caption_of(text: str) -> dict | None:
    """What a caption asks for (:func:`tokenloom.data.parse_caption`)."""
    from tokenloom.data import parse_caption

    return parse_caption(text)


class PromptAlignment(tokenloom.Metric):
    """The fraction of generated ``shapes`` images whose parsed content matches their prompt."""

    @attrs.frozen
    class Config:
        #: regions smaller than this many pixels are not shapes (the parser's noise floor)
        min_pixels: int = attrs.field(default=3, validator=attrs.validators.ge(1))

    requires = frozenset({"generated", "data"})  # and, for the ceilings, real / reconstructed when present
    card_name = "prompt-alignment"

    def _wanted(self, ctx: tokenloom.MetricContext) -> tuple[list[dict | None] | None, str | None]:
        from tokenloom.data import SHAPE_CLASSES, parse_caption

        data = ctx.data
        if data is None or tuple(getattr(data, "class_names", ()) or ()) != tuple(SHAPE_CLASSES):
            return None, "the data set is not `shapes` (ctx.data.class_names differ)"
        n = len(ctx.generated)
        conds = ctx.generated_conditions
        if conds is not None:
            if len(conds) != n:
                raise tokenloom.InputError(f"prompt-alignment: {len(conds)} generated_conditions for {n} images")
            out = []
            for c in conds:
                if getattr(c, "caption", None):
                    out.append(parse_caption(c.caption))
                elif getattr(c, "label", None) is not None:
                    out.append({"class": SHAPE_CLASSES[int(c.label)]})
                else:
                    out.append(None)
            return out, None
        labels = ctx.generated_labels
        if labels is None:
            return None, "no prompts and no classes for the generated images"
        if len(labels) != n:
            raise tokenloom.InputError(f"prompt-alignment: {len(labels)} generated_labels for {n} images")
        return [{"class": SHAPE_CLASSES[int(y)]} for y in labels.tolist()], None

    def judge(self, image, want: dict) -> dict[str, bool | None]:
        """Each attribute ``want`` names (None: not asked), and ``aligned``."""
        from tokenloom.data import parse_shapes

        found = parse_shapes(image, min_pixels=self.config.min_pixels)
        out: dict[str, bool | None] = {"count": None, "class": None, "colours": None}
        if "count" in want:
            out["count"] = len(found) == want["count"]
        if "class" in want:
            out["class"] = bool(found) and all(f["shape"] == want["class"] for f in found)
        if "colours" in want:
            out["colours"] = sorted(f["colour"] for f in found) == list(want["colours"])
        out["aligned"] = all(v for v in out.values() if v is not None)
        return out

    def compute(self, ctx: tokenloom.MetricContext) -> tokenloom.MetricResult:
        card = self.card(parser="tokenloom.data.parse_shapes (shape_regions: palette snapping, 4-connected "
                                "regions; class by fill ratio)", prompt_parser="tokenloom.data.parse_caption",
                         min_pixels=self.config.min_pixels)
        if ctx.generated is None or not len(ctx.generated):
            card["not_applicable"] = "no generated images"
            return tokenloom.MetricResult(dict.fromkeys(_KEYS), card)
        tokenloom.check_images(ctx.generated, tuple(ctx.generated.shape[1:]), where="prompt-alignment: ctx.generated")
        if ctx.generated.shape[1] != 3:
            raise tokenloom.InputError(f"prompt-alignment: ctx.generated must be RGB [N, 3, H, W], got "
                                       f"{tuple(ctx.generated.shape)}")
        wanted, reason = self._wanted(ctx)
        if wanted is None:
            card["not_applicable"] = reason
            return tokenloom.MetricResult(dict.fromkeys(_KEYS), card)
        verdicts = [self.judge(img, w) for img, w in zip(ctx.generated, wanted) if w is not None]
        combos = tuple(getattr(ctx.data, "holdout_combos", ()) or ())
        card["n_generated"] = len(ctx.generated)
        card["n_unparsed"] = sum(w is None for w in wanted)
        out: dict[str, Any] = dict.fromkeys(_KEYS)
        if verdicts:
            out["prompt_alignment"] = float(np.mean([v["aligned"] for v in verdicts]))
            for key, attr in (("prompt_count_ok", "count"), ("prompt_class_ok", "class"),
                              ("prompt_colour_ok", "colours")):
                asked = [v[attr] for v in verdicts if v[attr] is not None]
                out[key] = float(np.mean(asked)) if asked else None
        if combos and verdicts:
            from tokenloom.data import combo_matches, parse_combo

            parsed = [parse_combo(c) for c in combos]
            asks = [w for w in wanted if w is not None]
            unseen = [all(k in w for k in ("class", "count", "colours"))
                      and any(combo_matches(c, w) for c in parsed) for w in asks]
            for key, pick in (("prompt_alignment_unseen", True), ("prompt_alignment_seen", False)):
                hits = [v["aligned"] for v, u in zip(verdicts, unseen) if u == pick]
                out[key] = float(np.mean(hits)) if hits else None
            card["holdout_combos"] = list(combos)
            card["n_unseen"] = int(sum(unseen))
        captions = getattr(ctx.data, "captions", None)
        for key, images in (("prompt_alignment_real", ctx.real), ("prompt_alignment_reconstructed", ctx.reconstructed)):
            if images is None or captions is None or not len(images) or len(captions) < len(images):
                continue
            tokenloom.check_images(images, tuple(images.shape[1:]), where=f"prompt-alignment: ctx.{key.split('_')[-1]}")
            wants = [parse_caption_of(c) for c in captions[: len(images)]]
            hits = [self.judge(img, w)["aligned"] for img, w in zip(images, wants) if w is not None]
            out[key] = float(np.mean(hits)) if hits else None
        return tokenloom.MetricResult(out, card)


@tokenloom.hookimpl
def register_metrics(register):
    register("prompt-alignment", PromptAlignment)
