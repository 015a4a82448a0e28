"""``--prompts_file``: one row per prompt, from ``.txt``, ``.jsonl`` or ``.csv``, all rows checked before any runs.

A row's missing fields come from the command line; image *i* of a row uses the row's seed + *i*, as a run's images
do. A row's key (``jobs/rows.py``: a digest of all that decides its pixels) names its images, so a job run again finds
the images it already made even when rows were added, removed or moved, and never takes other settings' images.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from sd_utils.errors import UserInputError
from sd_utils.generation.schedulers import SAMPLERS
from sd_utils.options import MAX_SEED

# the columns a row may have, and how each is read
_INT = ("seed", "num_images", "num_inference_steps", "width", "height")
_FLOAT = ("guidance_scale",)
_TEXT = ("prompt", "negative_prompt", "scheduler")
COLUMNS = (*_TEXT[:2], *_INT[:3], *_FLOAT, *_INT[3:], _TEXT[2])
SUFFIXES = (".txt", ".jsonl", ".csv")


@dataclasses.dataclass(frozen=True)
class Row:
    """One row as the file gives it (None: take the command line's value); ``number`` counts from 1."""

    number: int
    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    num_images: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None


def _value(path: Path, number: int, column: str, raw: Any) -> Any:
    """The value of one cell, or :class:`UserInputError` naming the file, the row and the field."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    where = f"--prompts_file {path} row {number}, {column}"
    if column in _TEXT and not isinstance(raw, str):
        raise UserInputError(f"{where}: {raw!r} is not text; write it as a string")
    try:
        if isinstance(raw, bool):  # JSON true/false: Python counts them as 1/0
            raise TypeError
        if column in _INT:
            value = int(raw) if not isinstance(raw, float) or raw.is_integer() else int("x")
            if value < (0 if column == "seed" else 1) or (column == "seed" and value > MAX_SEED):
                raise ValueError
            return value
        if column in _FLOAT:
            value = float(raw)
            if not (math.isfinite(value) and 0 <= value <= 100):
                raise ValueError
            return value
    except (TypeError, ValueError):
        kind = (
            f"an integer from 0 to {MAX_SEED}"
            if column == "seed"
            else "a positive integer"
            if column in _INT
            else "0 to 100"
        )
        raise UserInputError(f"{where}: {raw!r} is not {kind}; fix the row") from None
    text = str(raw)
    if column == "scheduler" and text not in SAMPLERS:
        raise UserInputError(f"{where}: unknown scheduler {text!r}; use one of {', '.join(SAMPLERS)}")
    return text


def _row(path: Path, number: int, cells: dict[str, Any]) -> Row:
    unknown = sorted(set(cells) - set(COLUMNS))
    if unknown:
        raise UserInputError(
            f"--prompts_file {path} row {number}: unknown field {unknown[0]!r}; the fields are {', '.join(COLUMNS)}"
        )
    values = {column: _value(path, number, column, raw) for column, raw in cells.items()}
    if not values.get("prompt"):
        raise UserInputError(f"--prompts_file {path} row {number}, prompt: empty; every row needs a prompt")
    return Row(number=number, **values)


def _records(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    """(row number, cells) of every row: line numbers for .txt and .jsonl, data rows for .csv."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [
            (number, {"prompt": line.strip()})
            for number, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")
        ]
    if suffix == ".csv":
        return _csv_records(path, text)
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            cells = json.loads(line)
        except ValueError as error:
            raise UserInputError(f"--prompts_file {path} row {number}: not a JSON object ({error.msg})") from None
        if not isinstance(cells, dict):
            raise UserInputError(f'--prompts_file {path} row {number}: not a JSON object; write {{"prompt": ...}}')
        records.append((number, cells))
    return records


def _csv_records(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    """Data rows of a CSV file; a row with more cells than the header (an unquoted comma) is an error, not a cut."""
    reader = csv.DictReader(text.splitlines())
    records = []
    for number, row in enumerate(reader, 1):
        if None in row:
            columns = len(reader.fieldnames or ())
            raise UserInputError(
                f"--prompts_file {path} row {number} has {columns + len(row[None])} cells but the header has "
                f'{columns}: quote a prompt that has commas ("a red circle, on the left"), or use a .txt file'
            )
        records.append((number, row))
    return records


def read_prompts_file(path: Path) -> list[Row]:
    """Every row of ``path``, all checked: the first bad one raises :class:`UserInputError` naming row and field."""
    if path.suffix.lower() not in SUFFIXES:
        raise UserInputError(f"--prompts_file {path}: use a {', '.join(SUFFIXES)} file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise UserInputError(f"--prompts_file {path} cannot be read ({error}); give a UTF-8 text file") from None
    rows = [_row(path, number, cells) for number, cells in _records(path, text)]
    if not rows:
        raise UserInputError(f"--prompts_file {path} has no prompts; write one prompt per line (or row)")
    return rows
