"""examples/text-to-image.toml with the ``text-encoder`` conditioner, offline.

No pretrained text encoder can be downloaded here, so this builds a tiny *randomly initialised* T5
encoder (2 layers, width 32) over the shapes caption words, saves it with ``save_pretrained`` to
``<out>/encoder`` and runs the example config with ``[conditioner] name = "text-encoder"``,
``path = <out>/encoder`` for each generator given — a measurement of the machinery (frozen
random features of the words, projected by the trained ``cond_proj``), not of T5::

    python bench/t2i_text_encoder.py --out runs/t2i-te --generator raster --generator masked
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["[PAD]", "[UNK]", "</s>", "a", "one", "two", "three", "red", "green", "blue", "yellow", "magenta",
         "cyan", "circle", "circles", "square", "squares", "triangle", "triangles", "and", "in", ",", "1", "2",
         "3"]


def build_encoder(path: Path) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    if (path / "config.json").is_file():
        return
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                eos_token="</s>")
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(transformers.T5Config(vocab_size=len(WORDS), d_model=32, d_ff=64,
                                                              num_layers=2, num_heads=4, d_kv=8))
    model.save_pretrained(path)
    fast.save_pretrained(path)


def main() -> None:
    from tokenloom.config import parse_config, read_toml
    from tokenloom.pipeline import run

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/t2i-text-encoder")
    ap.add_argument("--generator", action="append", default=None)
    ap.add_argument("--scale", type=float, default=3.0)
    args = ap.parse_args()
    out = Path(args.out)
    build_encoder(out / "encoder")
    raw = read_toml(ROOT / "examples" / "text-to-image.toml")
    raw["conditioner"] = {"name": "text-encoder", "path": str(out / "encoder"), "max_tokens": 10}
    raw["sampler"] = [{"name": "cfg", "scale": args.scale}]
    for g in args.generator or ["raster"]:
        name, _, steps = g.partition(":")
        raw["generator"] = {"name": name, **({"steps": int(steps)} if steps else {})}
        record = run(parse_config(json.loads(json.dumps(raw))), out, progress=False)
        keep = ("prompt_alignment", "prompt_count_ok", "prompt_class_ok", "prompt_colour_ok", "shapes_valid",
                "nll_bits_per_image", "nfe", "seconds_per_image", "prompt_alignment_real",
                "prompt_alignment_reconstructed")
        print(json.dumps({"generator": g, **{k: record["metrics"].get(k) for k in keep}}), flush=True)


if __name__ == "__main__":
    main()
