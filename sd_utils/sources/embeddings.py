"""``--embedding FILE`` / ``--embedding_dir DIR``: SDXL textual-inversion embeddings (``clip_l`` and ``clip_g``
vectors in a ``.safetensors`` file), checked against the model before anything runs.

The file's stem is the word that stands for its vectors in prompts. The optimized text encoders are not built again:
each embedding's vectors take over rows of the encoders' token table at session creation (``runtime/token_table.py``),
for token ids at the top of the vocabulary, just below the start token — the rarest BPE merges, which prompts
practically never use — so the graph, its shapes and its pooling (at the end token) stay as they are.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from sd_utils.errors import ModelNotFoundError
from sd_utils.sources import single_file

logger = logging.getLogger(__name__)

# the tensors of an SDXL embedding file, by the text encoder they belong to
VECTORS_OF = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}


@dataclasses.dataclass(frozen=True)
class Embedding:
    name: str  # the word in prompts
    path: Path
    vectors: dict[str, np.ndarray]  # text encoder -> (vectors, width), float32


@dataclasses.dataclass(frozen=True)
class Embeddings:
    """The run's embeddings with the token ids their vectors take: ``words`` for the prompt grammar, ``rows`` for the
    token tables (text encoder -> token id -> vector)."""

    items: tuple[Embedding, ...] = ()
    words: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    rows: dict[str, dict[int, np.ndarray]] = dataclasses.field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.items)


def load_embeddings(files: Iterable[Path], folders: Iterable[Path], *, model_root: Path) -> Embeddings:
    """Every ``--embedding`` file and the SDXL embedding files of every ``--embedding_dir``, checked against the
    text encoders of ``model_root`` (one line naming a file that does not fit)."""
    widths = _encoder_widths(model_root)
    paths = [(Path(path).expanduser(), "--embedding") for path in files]
    for folder in (Path(folder).expanduser() for folder in folders):
        if not folder.is_dir():
            raise ModelNotFoundError(f"--embedding_dir {folder}: no such folder; check the path")
        paths += [(path, f"--embedding_dir {folder}:") for path in sorted(folder.glob("*.safetensors"))]
    items: dict[str, Embedding] = {}
    for path, option in paths:
        embedding = _load(path, option, widths=widths, from_folder=option != "--embedding")
        if embedding is not None:
            items[embedding.name] = embedding  # a later file of the same name wins, as later options do
    return _with_token_ids(tuple(items.values()), model_root=model_root)


def _encoder_widths(model_root: Path) -> dict[str, int]:
    widths = {}
    for encoder in VECTORS_OF:
        config = model_root / encoder / "config.json"
        if config.is_file():
            widths[encoder] = int(json.loads(config.read_text(encoding="utf-8"))["hidden_size"])
    return widths


def _load(path: Path, option: str, *, widths: dict[str, int], from_folder: bool) -> Embedding | None:
    if not path.is_file():
        raise ModelNotFoundError(f"{option} {path}: no such file; check the path")
    header = single_file.read_header(path, option)  # refuses pickles and incomplete files
    wanted = {encoder: VECTORS_OF[encoder] for encoder in widths}
    if not set(wanted.values()) <= set(header):
        if from_folder:  # a folder may hold other files (LoRAs, SD 1.5 embeddings)
            logger.info("%s %s is not an SDXL embedding (no %s): skipped", option, path, "/".join(wanted.values()))
            return None
        raise ModelNotFoundError(
            f"{option} {path} is not an SDXL embedding (it has no {' and '.join(wanted.values())} tensors); give an "
            "SDXL textual-inversion file"
        )
    for encoder, key in wanted.items():
        shape = header[key]["shape"]
        if len(shape) != 2 or shape[1] != widths[encoder]:
            raise ModelNotFoundError(
                f"{option} {path}: its {key} vectors are {'x'.join(map(str, shape))}, the model's {encoder} takes "
                f"width {widths[encoder]}; give an embedding made for this model"
            )
    from safetensors.numpy import load_file

    tensors = load_file(path)
    vectors = {encoder: tensors[key].astype(np.float32) for encoder, key in wanted.items()}
    return Embedding(name=path.stem, path=path.resolve(), vectors=vectors)


def _with_token_ids(items: tuple[Embedding, ...], *, model_root: Path) -> Embeddings:
    """Token ids for every vector, downwards from just below the start token."""
    if not items:
        return Embeddings()
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(model_root / "tokenizer_2")
    next_id = min(tokenizer.bos_token_id, tokenizer.eos_token_id) - 1
    words, rows = {}, {encoder: {} for encoder in items[0].vectors}
    for embedding in items:
        count = len(next(iter(embedding.vectors.values())))
        ids = tuple(range(next_id, next_id - count, -1))
        next_id -= count
        words[embedding.name] = ids
        for encoder, vectors in embedding.vectors.items():
            rows[encoder].update(zip(ids, vectors, strict=True))
    logger.info("embeddings: %s", ", ".join(f"{item.name} ({len(words[item.name])} vectors)" for item in items))
    return Embeddings(items=items, words=words, rows=rows)


def word_pattern(words: Iterable[str]) -> re.Pattern | None:
    """A pattern matching any of ``words`` as a whole word (the prompt grammar splits text around them)."""
    names = sorted(words, key=len, reverse=True)
    return re.compile(r"(?<![\w])(" + "|".join(map(re.escape, names)) + r")(?![\w])") if names else None
