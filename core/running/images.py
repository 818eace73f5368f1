"""Image grids as PNG files — the one writer of every grid a run or a tokenizer fit draws.

:func:`grid_image` lays out rows of images (``[n, C, H, W]`` in [-1, 1]) on a padded canvas;
:func:`save_grid` writes a run's sample grid (``samples/<run-id>.png``, :data:`GRID_NCOL` columns,
:data:`GRID_PAD`-px padding — what :func:`tokenloom.reports.first_row_of_grid` reads back).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..contract.checkpoint import atomic_write

#: The layout of a run's sample grid: columns and padding (pixels) between and around the cells.
GRID_NCOL, GRID_PAD = 8, 2
#: The PNG text chunk in which :func:`save_grid` records the grid's layout (JSON: ``ncol``,
#: ``cell`` [height, width] in pixels, ``pad``, ``rows``) for readers such as the overview.
GRID_LAYOUT_KEY = "tokenloom-grid"


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[n, C, H, W]`` in [-1, 1] -> ``uint8`` RGB ``[n, 3, H, W]`` (one channel repeated)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]


def grid_image(rows: Sequence[torch.Tensor], *, scale: int = 1, pad: int = GRID_PAD, background: int = 255,
               ncol: int = 0) -> Any:
    """A PIL image with one grid row per tensor of ``rows`` (``[n, C, H, W]`` in [-1, 1]), each image
    upscaled ``scale``× by nearest neighbour, ``pad`` pixels of grey level ``background`` between and
    around them; at least ``ncol`` columns wide."""
    from PIL import Image

    _c, h, w = rows[0].shape[1:]
    H, W = h * scale, w * scale
    n = max([ncol] + [r.shape[0] for r in rows])
    canvas = torch.full((len(rows) * (H + pad) + pad, n * (W + pad) + pad, 3), background, dtype=torch.uint8)
    for ri, r in enumerate(rows):
        x = to_uint8(r).repeat_interleave(scale, 2).repeat_interleave(scale, 3).permute(0, 2, 3, 1)
        for i in range(x.shape[0]):
            y0, x0 = pad + ri * (H + pad), pad + i * (W + pad)
            canvas[y0 : y0 + H, x0 : x0 + W] = x[i]
    return Image.fromarray(canvas.numpy())


def save_png(path: Path, image: Any, *, text: dict[str, str] | None = None) -> None:
    """Write a PIL image as PNG, atomically (``text``: PNG text chunks)."""
    info = None
    if text:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for k, v in text.items():
            info.add_text(k, v)
    with atomic_write(path) as fh:
        image.save(fh, format="PNG", pnginfo=info)


def save_grid(path: Path, images: torch.Tensor, *, ncol: int = GRID_NCOL, context: torch.Tensor | None = None,
              min_cell: int = 64) -> None:
    """Write an image grid PNG (atomically), ``ncol`` images a row, each upscaled to at least
    ``min_cell`` pixels. With ``context`` (the known region of each sample, unknown parts greyed),
    rows alternate: context, then the samples generated from it."""
    rows = []
    for i in range(0, images.shape[0], ncol):
        if context is not None:
            rows.append(context[i : i + ncol])
        rows.append(images[i : i + ncol])
    h, w = images.shape[-2:]
    scale = max(1, math.ceil(min_cell / max(h, w)))
    layout = {"ncol": max([ncol] + [r.shape[0] for r in rows]), "cell": [h * scale, w * scale], "pad": GRID_PAD,
              "rows": len(rows)}
    save_png(path, grid_image(rows, scale=scale, ncol=ncol), text={GRID_LAYOUT_KEY: json.dumps(layout)})


__all__ = ["GRID_LAYOUT_KEY", "GRID_NCOL", "GRID_PAD", "grid_image", "save_grid", "save_png", "to_uint8"]
