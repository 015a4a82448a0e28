"""Prompts as A1111 users write them: emphasis weights, ``BREAK`` and prompts longer than CLIP's 77 tokens.

The grammar is A1111's ("Original" emphasis), written here for the tool's ONNX text encoders:

* ``(text)`` multiplies the weight of its tokens by 1.1, ``[text]`` divides it by 1.1, ``(text:W)`` multiplies it by
  ``W``; nesting multiplies. ``\\(``, ``\\)``, ``\\[``, ``\\]`` are literal brackets. A bracket left open applies to
  the end of the prompt; a closing bracket with nothing open is text.
* ``BREAK`` (upper case, a word on its own) ends the current chunk.
* Neighbouring pieces of equal weight are joined, and each piece is tokenized on its own (no start or end token),
  its tokens carrying its weight. Tokens are cut into chunks of 75; a chunk is encoded as start token + its tokens +
  end token, padded to 77 with the tokenizer's own pad id, so a plain prompt of up to 75 tokens gives exactly the
  ids a plain tokenizer call gives.

No library does this for ONNX encoders: ``compel`` needs the PyTorch text encoders, A1111's code is part of its web UI.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from sd_utils.generation.lora_tags import without_tags
from sd_utils.sources.embeddings import word_pattern

EMPHASIS = 1.1  # what one pair of round brackets multiplies a weight by (square brackets divide)
CHUNK_TOKENS = 75  # tokens of a chunk between its start and end tokens (CLIP reads 77)
_BREAK = object()  # the piece a BREAK becomes

# one lexical element: an escaped bracket or backslash, a bracket, ":W)" closing a weighted group, plain text, or ":"
_ELEMENT = re.compile(
    r"""
    \\[()\[\]\\]            # \( \) \[ \] \\ : the character itself
  | \\                      # a lone backslash: itself
  | [(\[]                   # an opening bracket
  | :\s*([+-]?[.\d]+)\s*\)  # ":1.2)": closes a round group with its weight
  | [)\]]                   # a closing bracket
  | [^\\()\[\]:]+           # plain text
  | :                       # a colon that is not a weight
    """,
    re.VERBOSE,
)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")


def parse(prompt: str) -> list[tuple[object, float]]:
    """``prompt`` as (text, weight) pieces in order, equal neighbours joined; a ``BREAK`` is a piece of its own
    (see :func:`is_break`). ``<lora:…>`` tags are no text (``generation/lora_tags.py``)."""
    prompt = without_tags(prompt)
    pieces: list[list] = []
    round_open: list[int] = []  # where each open bracket's pieces start
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece[0] is not _BREAK:
                piece[1] *= factor

    for match in _ELEMENT.finditer(prompt):
        text, weight = match.group(0), match.group(1)
        if text.startswith("\\") and len(text) == 2:
            pieces.append([text[1], 1.0])
        elif text == "(":
            round_open.append(len(pieces))
        elif text == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif text == ")" and round_open:
            multiply(round_open.pop(), EMPHASIS)
        elif text == "]" and square_open:
            multiply(square_open.pop(), 1 / EMPHASIS)
        else:
            for index, part in enumerate(_BREAK_WORD.split(text)):
                if index:
                    pieces.append([_BREAK, -1.0])
                pieces.append([part, 1.0])
    for start in round_open:  # left open: to the end of the prompt
        multiply(start, EMPHASIS)
    for start in square_open:
        multiply(start, 1 / EMPHASIS)
    return _joined(pieces)


def _joined(pieces: list[list]) -> list[tuple[object, float]]:
    joined: list[list] = []
    for text, weight in pieces:
        if text == "":
            continue
        if joined and text is not _BREAK and joined[-1][0] is not _BREAK and joined[-1][1] == weight:
            joined[-1][0] += text
        else:
            joined.append([text, weight])
    return [(text, weight) for text, weight in joined] or [("", 1.0)]


def is_break(piece: object) -> bool:
    return piece is _BREAK


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One encoder input: 77 token ids (start, up to 75 prompt tokens, end, padding) and a weight per id."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]


def chunks(tokenizer, prompt: str, words: Mapping[str, tuple[int, ...]] | None = None) -> list[Chunk]:
    """``prompt`` (the grammar above) as the chunks ``tokenizer``'s text encoder reads, each ``model_max_length``
    (77) ids long. An empty prompt is one chunk, as a plain tokenizer call gives it. ``words``: whole words that stand
    for token ids of their own (textual-inversion embeddings), weighted like the text around them."""
    length = tokenizer.model_max_length
    per_chunk = min(CHUNK_TOKENS, length - 2)
    made: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []

    def close() -> None:
        pad = length - 2 - len(ids)
        made.append(
            Chunk(
                ids=(tokenizer.bos_token_id, *ids, tokenizer.eos_token_id, *[tokenizer.pad_token_id] * pad),
                weights=(1.0, *weights, 1.0, *[1.0] * pad),
            )
        )
        ids.clear()
        weights.clear()

    pattern = word_pattern(words or {})
    for text, weight in parse(prompt):
        if is_break(text):
            close()
            continue
        for token in _tokens(tokenizer, text, words or {}, pattern):
            if len(ids) == per_chunk:
                close()
            ids.append(token)
            weights.append(weight)
    if ids or not made:
        close()
    return made


def _tokens(tokenizer, text: str, words: Mapping[str, tuple[int, ...]], pattern) -> list[int]:
    """The token ids of ``text``, ``words`` (found by ``pattern``) replaced by their own ids."""
    parts = pattern.split(text) if pattern else [text]
    tokens: list[int] = []
    for index, part in enumerate(parts):  # split() puts the matched words at the odd places
        if index % 2:
            tokens += words[part]
        elif part:
            tokens += tokenizer(part, add_special_tokens=False, truncation=False, verbose=False).input_ids
    return tokens


def chunk_count(tokenizer, *prompts: str | None, words: Mapping[str, tuple[int, ...]] | None = None) -> int:
    """How many chunks the longest of ``prompts`` takes (the UNet's text sequence is 77 x this)."""
    return max((len(chunks(tokenizer, prompt, words)) for prompt in prompts if prompt), default=1)
