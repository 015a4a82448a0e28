"""``<lora:name:weight>`` in a prompt (A1111's extra-network syntax): the LoRAs a prompt asks for, found by name in
the ``--lora_dir`` folders, and the prompt without the tags (what the text encoders read)."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence
from pathlib import Path

from sd_utils.errors import UserInputError

TAG = re.compile(r"<lora:([^:>]*)(?::([^>]*))?>")


def without_tags(prompt: str) -> str:
    """``prompt`` as the text encoders read it: the LoRA tags removed (as A1111 does, the text around them stays)."""
    return TAG.sub("", prompt)


def prompt_loras(prompt: str) -> list[tuple[str, float]]:
    """(name, weight) of each ``<lora:name:weight>`` tag of ``prompt``; the weight defaults to 1."""
    found = []
    for match in TAG.finditer(prompt):
        name, weight = match.group(1).strip(), (match.group(2) or "1").strip()
        if not name:
            raise UserInputError(f"prompt tag {match.group(0)} names no LoRA; write <lora:NAME:0.8>")
        try:
            value = float(weight)
        except ValueError:
            raise UserInputError(
                f"prompt tag {match.group(0)}: weight {weight!r} is not a number; write <lora:{name}:0.8> (A1111's "
                "per-part weights are not read)"
            ) from None
        if not (math.isfinite(value) and -10 <= value <= 10):
            raise UserInputError(f"prompt tag {match.group(0)}: the weight must be from -10 to 10")
        found.append((name, value))
    return found


def lora_names(lora_dirs: Sequence[Path]) -> dict[str, Path]:
    """name -> file of each ``.safetensors`` file in the folders (subfolders too, as A1111's LoRA folder); the first
    folder given wins a name found twice."""
    names: dict[str, Path] = {}
    for folder in lora_dirs:
        for path in sorted(Path(folder).expanduser().rglob("*.safetensors")):
            names.setdefault(path.stem, path)
    return names


def find_lora(name: str, lora_dirs: Sequence[Path]) -> Path:
    """The file of ``<lora:name>``: ``name.safetensors`` in ``lora_dirs``; a one-line :class:`UserInputError`
    naming the closest names found when there is none."""
    if not lora_dirs:
        raise UserInputError(
            f"the prompt asks for <lora:{name}> but no --lora_dir is given; add --lora_dir DIR (the folder holding "
            f"{name}.safetensors)"
        )
    names = lora_names(lora_dirs)
    if name in names:
        return names[name]
    folded = {key.casefold(): path for key, path in names.items()}
    if name.casefold() in folded:
        return folded[name.casefold()]
    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.5)
    where = ", ".join(str(folder) for folder in lora_dirs)
    hint = f"the closest names there: {', '.join(close)}" if close else f"it has {len(names)} LoRA file(s)"
    raise UserInputError(f"<lora:{name}> in the prompt: no {name}.safetensors in --lora_dir {where}; {hint}")
