"""The SDXL tokenizers built from open-clip's BPE file give the same ids as open_clip's own tokenizer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from sd_utils.sources.tokenizers import EOS_TOKEN, MODEL_MAX_LENGTH, save_sdxl_tokenizers

SENTENCES = [
    "a photo of an astronaut riding a horse on mars",
    "A RED circle, on the left; dark background??? (yes: really...)",
    "portrait of a cat -- 35mm, f/1.8, 4k, ISO 400, 1/250s",
    "café crème brûlée, naïve façade, Zürich über alles",
    "日本の富士山と桜, 漢字 and emoji 🐱🚀 mixed",
    "numbers 1234567890 3.14159 -42 1e10 #hashtag @mention",
    "don't can't it's we're they've I'm you'll he'd",
    "   lots   of\twhitespace\nand newlines   ",
    " ".join(f"word{index}" for index in range(120)),  # far more than 77 tokens: truncated
    "",
]


def _open_clip_tokenizer():
    """open_clip's reference ``SimpleTokenizer``, loaded from its file: ``import open_clip`` needs torchvision."""
    spec = importlib.util.find_spec("open_clip")
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("open_clip_reference_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer(context_length=MODEL_MAX_LENGTH)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizers")
    save_sdxl_tokenizers(folder)
    return {name: CLIPTokenizer.from_pretrained(folder / name) for name in ("tokenizer", "tokenizer_2")}


@pytest.mark.parametrize("text", SENTENCES)
def test_tokenizer_2_matches_open_clip(tokenizers, text):
    # open_clip pads with id 0 ("!"), exactly like SDXL's tokenizer_2
    reference = _open_clip_tokenizer()([text])[0].tolist()
    ours = tokenizers["tokenizer_2"](text, padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True)
    assert ours.input_ids == reference


@pytest.mark.parametrize("text", SENTENCES)
def test_tokenizer_matches_open_clip_up_to_padding(tokenizers, text):
    reference = _open_clip_tokenizer()([text])[0].tolist()
    tokenizer = tokenizers["tokenizer"]
    ours = tokenizer(text, padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True).input_ids
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    length = reference.index(eos) + 1
    assert ours[:length] == reference[:length]
    # SDXL's first tokenizer pads with <|endoftext|>
    assert ours[length:] == [eos] * (MODEL_MAX_LENGTH - length)


def test_tokenizer_ids_are_the_published_clip_ids(tokenizers):
    ids = tokenizers["tokenizer_2"]("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizers["tokenizer_2"].pad_token_id == 0
    assert tokenizers["tokenizer"].pad_token_id == 49407
    assert len(tokenizers["tokenizer"]) == 49408


def test_exclamation_mark_splits_like_the_hub_tokenizer_2(tokenizers):
    """The one known difference from open_clip, shared with stabilityai's own tokenizer_2: "!" is its pad token, so
    transformers splits text on it before BPE ("!!!" -> three "!" tokens; open_clip merges them)."""
    reference = _open_clip_tokenizer()(["wow!!!"])[0].tolist()
    ours = tokenizers["tokenizer_2"]("wow!!!").input_ids
    assert ours == [49406, reference[1], 0, 0, 0, 49407]
    assert reference[2] != 0
