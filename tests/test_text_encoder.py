"""The text-encoder conditioner: a frozen transformers encoder (T5 encoder, CLIP text model)
loaded from a local directory — tiny, randomly initialised ones saved here with save_pretrained —
passes the conformance kit and conditions a whole run; a bad directory or a missing library is
a clear ConfigError."""

from __future__ import annotations

import json
import sys

import pytest

import tokenloom
import tokenloom.testing

transformers = pytest.importorskip("transformers", reason="text-encoder needs transformers: "
                                   "pip install 'tokenloom[text]' (the dev extra installs it)")
pytest.importorskip("tokenizers", reason="the tiny encoders' tokenizer is built with tokenizers")

WORDS = ["[PAD]", "[UNK]", "</s>", "a", "one", "two", "three", "red", "green", "blue", "yellow", "magenta",
         "cyan", "circle", "circles", "square", "squares", "triangle", "triangles", "and", "in", ",", "1", "2",
         "3"]


def _tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                eos_token="</s>")


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=len(WORDS), d_model=16, d_ff=32, num_layers=1,
                                                           num_heads=2, d_kv=8))
    t5.save_pretrained(root / "t5")
    _tokenizer().save_pretrained(root / "t5")
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(WORDS), hidden_size=12, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=32, pad_token_id=0, bos_token_id=2, eos_token_id=2))
    clip.save_pretrained(root / "clip")
    _tokenizer().save_pretrained(root / "clip")
    (root / "no-tokenizer").mkdir()
    t5.save_pretrained(root / "no-tokenizer")
    return root


@pytest.mark.parametrize("kind", ["t5", "clip"])
def test_the_kit_passes_for_a_local_encoder(encoders, kind):
    tokenloom.testing.check("conditioner", "text-encoder", path=str(encoders / kind))


def test_prefix_is_the_encoder_states_left_padded_then_their_mean(encoders):
    import torch

    c = tokenloom.create("conditioner", "text-encoder", path=str(encoders / "t5"), max_tokens=6)
    p = c.encode([tokenloom.Condition(caption="two red squares")])
    assert p.mask.tolist() == [[False, False, False, True, True, True, True]] and p.embeddings.shape == (1, 7, 16)
    ids = c.tokenizer("two red squares")["input_ids"]
    with torch.no_grad():
        h = c._encoder(input_ids=torch.tensor([ids])).last_hidden_state[0]
    torch.testing.assert_close(p.embeddings[0, 3:6], h)
    torch.testing.assert_close(p.embeddings[0, 6], h.mean(0))
    c2 = tokenloom.create("conditioner", "text-encoder", path=str(encoders / "t5"), max_tokens=2)
    with pytest.warns(UserWarning, match="truncated to max_tokens = 2"):
        short = c2.encode([tokenloom.Condition(caption="two red squares")])
    assert short.mask.all()
    with pytest.warns(UserWarning, match="null condition"):
        empty = c.encode([tokenloom.Condition(caption="")])
    assert torch.equal(empty.embeddings, c.null().embeddings) and torch.equal(empty.mask, c.null().mask)


def test_bad_directories_and_a_missing_library_are_config_errors(encoders, tmp_path, monkeypatch):
    with pytest.raises(tokenloom.ConfigError, match="no such directory"):
        tokenloom.create("conditioner", "text-encoder", path=str(tmp_path / "nowhere"))
    with pytest.raises(tokenloom.ConfigError, match="no usable tokenizer"):
        tokenloom.create("conditioner", "text-encoder", path=str(encoders / "no-tokenizer"))
    with pytest.raises(tokenloom.ConfigError, match="holds no config.json"):
        tokenloom.create("conditioner", "text-encoder", path=str(tmp_path))
    with pytest.raises(tokenloom.ConfigError, match="path"):
        tokenloom.create("conditioner", "text-encoder")  # the path is required
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(tokenloom.ConfigError, match=r"pip install 'tokenloom\[text\]'"):
        tokenloom.create("conditioner", "text-encoder", path=str(encoders / "t5"))


def test_a_text_encoder_run(encoders, tmp_path):
    from tokenloom.config import parse_config
    from tokenloom.pipeline import run

    raw = {"seed": 0, "data": {"name": "shapes", "size": 8, "n": 32, "n_holdout": 8},
           "tokenizer": {"name": "pixel", "bits": 1, "pool": 4}, "generator": {"name": "masked", "steps": 2},
           "conditioner": {"name": "text-encoder", "path": str(encoders / "t5"), "max_tokens": 8},
           "model": {"n_layer": 1, "d_model": 16, "n_head": 2}, "train": {"steps": 3, "batch_size": 8},
           "sampler": [{"name": "cfg", "scale": 1.5}],
           "metrics": {"names": ["prompt-alignment"], "n_samples": 16}}
    rec = run(parse_config(json.loads(json.dumps(raw))), tmp_path / "run", progress=False)
    assert rec["conditioning"]["conditioner"] == "text-encoder" and rec["metrics"]["nfe"] == 2
    assert rec["metrics"]["prompt_alignment"] is not None
