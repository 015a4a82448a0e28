"""Real CLIP BPE tokenizers for SDXL, built from the vocabulary inside the ``open-clip-torch`` wheel.

No model hub is needed: the BPE merge list that OpenAI's CLIP (and both SDXL text encoders) use ships as
``open_clip/bpe_simple_vocab_16e6.txt.gz``. From it we write the ordinary ``vocab.json`` / ``merges.txt`` files of a
``transformers.CLIPTokenizer``, configured the way SDXL's two tokenizers are: ``tokenizer`` pads with
``<|endoftext|>``, ``tokenizer_2`` pads with ``!`` (id 0).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import zipfile
from pathlib import Path

from transformers import CLIPTokenizer
from transformers.models.clip.tokenization_clip import bytes_to_unicode

from sd_utils.errors import SetupError

logger = logging.getLogger(__name__)

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 49152 - 256 - 2 merges of the file (the same slice open_clip and transformers use).
NUM_MERGES = 49152 - 256 - 2
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
# The pad token of each SDXL tokenizer (stabilityai/stable-diffusion-xl-base-1.0, tokenizer*/special_tokens_map.json).
PAD_TOKENS = {"tokenizer": EOS_TOKEN, "tokenizer_2": "!"}


def find_bpe_vocabulary() -> bytes:
    """Return the gzip-compressed CLIP BPE merge list that ships with ``open-clip-torch``.

    The package is looked up without importing it: ``import open_clip`` pulls torchvision, which the pinned torch
    cannot load.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE_NAME
        if candidate.is_file():
            return candidate.read_bytes()
    raise SetupError(
        f"the CLIP vocabulary {BPE_FILE_NAME} was not found; install it with "
        "'pip install --no-deps open-clip-torch==3.3.0'"
    )


def read_bpe_wheel(wheel: Path) -> bytes:
    """Read the BPE vocabulary straight out of an ``open_clip_torch`` wheel file (no install needed)."""
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(f"open_clip/{BPE_FILE_NAME}")


def clip_vocabulary(bpe_gz: bytes) -> tuple[dict[str, int], list[str]]:
    """Build CLIP's token -> id table and merge list from the gzip-compressed BPE file.

    Mirrors the construction in openai/CLIP's ``SimpleTokenizer.__init__``: byte tokens, byte tokens with the
    end-of-word marker, one token per merge, then the two special tokens.
    """
    lines = gzip.decompress(bpe_gz).decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [token + "</w>" for token in byte_tokens]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, merges


def save_sdxl_tokenizers(pipeline_dir: Path, *, names: tuple[str, ...] = ("tokenizer", "tokenizer_2")) -> None:
    """Write the SDXL tokenizers named in ``names`` as ``CLIPTokenizer`` folders under ``pipeline_dir``."""
    vocab, merges = clip_vocabulary(find_bpe_vocabulary())
    for name in names:
        folder = pipeline_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tokenizer = CLIPTokenizer(
            folder / "vocab.json",
            folder / "merges.txt",
            pad_token=PAD_TOKENS[name],
            model_max_length=MODEL_MAX_LENGTH,
        )
        tokenizer.save_pretrained(folder)
        logger.debug("wrote %s (%d tokens)", folder, len(vocab))
