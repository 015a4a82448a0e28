"""``--from_png``: the A1111 ``parameters`` text of a PNG (this tool's, A1111's, Forge's) read back into options.

The format: the prompt (any number of lines), then optionally ``Negative prompt: ...`` (any number of lines), then
one line of ``Key: value`` pairs separated by commas, values with separators JSON-quoted. Only the standard library
is needed; A1111's own reader is part of its web UI.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from sd_utils.errors import UserInputError
from sd_utils.generation.schedulers import SAMPLERS

# one "Key: value" of the settings line; a value is JSON-quoted when it holds a comma, colon or quote
_PAIR = re.compile(r'\s*(\w[\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


@dataclasses.dataclass(frozen=True)
class PngParameters:
    """What a PNG's parameters say: the option values they give (by option name) and what is only reported."""

    options: dict[str, Any]
    model: str | None = None
    model_hash: str | None = None


def read_png_parameters(path: Path) -> PngParameters:
    """The A1111 ``parameters`` chunk of ``path``; one-line :class:`UserInputError` when there is none."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            text = image.info.get("parameters")
    except (OSError, UnidentifiedImageError) as error:
        raise UserInputError(f"--from_png {path} is not a readable image ({error}); give a PNG") from None
    if not isinstance(text, str) or not text.strip():
        raise UserInputError(
            f"--from_png {path} has no A1111 parameters (no 'parameters' text chunk); give a PNG made by sdxl-olive, "
            "A1111 or Forge with its metadata kept"
        )
    return parse_parameters(text, source=str(path))


def parse_parameters(text: str, *, source: str = "--from_png") -> PngParameters:
    """``text`` in A1111's format as options (``prompt``, ``negative_prompt``, ``num_inference_steps``,
    ``guidance_scale``, ``seed``, ``width``, ``height``, ``scheduler``, ``strength``)."""
    prompt, negative, settings = split_parameters(text)
    options: dict[str, Any] = {"prompt": prompt}
    if negative is not None:
        options["negative_prompt"] = negative
    try:
        options.update(_settings(settings))
    except ValueError as error:
        raise UserInputError(f"{source}: its parameters line has {error}; the PNG's metadata is damaged") from None
    return PngParameters(options, model=settings.get("Model"), model_hash=settings.get("Model hash"))


def split_parameters(text: str) -> tuple[str, str | None, dict[str, str]]:
    """(prompt, negative prompt or None, the settings line's ``Key: value`` pairs) of A1111's parameters text."""
    lines = text.strip().split("\n")
    settings = _pairs(lines.pop()) if lines and lines[-1].lstrip().startswith("Steps:") else {}
    prompt_lines, negative_lines, target = [], [], None
    for line in lines:
        if line.startswith("Negative prompt:"):
            target = negative_lines
            line = line.removeprefix("Negative prompt:").lstrip()
        (prompt_lines if target is None else target).append(line)
    negative = "\n".join(negative_lines).strip() if negative_lines else None
    return "\n".join(prompt_lines).strip(), negative, settings


def _pairs(line: str) -> dict[str, str]:
    pairs = {}
    for key, value in _PAIR.findall(line):
        if value.startswith('"') and value.endswith('"') and len(value) > 1:
            value = json.loads(value)
        pairs[key.strip()] = value.strip()
    return pairs


def _settings(settings: dict[str, str]) -> dict[str, Any]:
    """The options the settings line gives; a value that does not parse raises ValueError naming it."""
    options: dict[str, Any] = {}
    readers = {
        "Steps": ("num_inference_steps", int),
        "CFG scale": ("guidance_scale", float),
        "Seed": ("seed", int),
        "Denoising strength": ("strength", float),
        "CFG cutoff": ("cfg_cutoff", float),
        "DeepCache interval": ("cache_interval", int),
    }
    for key, (option, kind) in readers.items():
        if key in settings:
            try:
                options[option] = kind(settings[key])
            except ValueError:
                raise ValueError(f"{key}: {settings[key]!r}") from None
    if "Size" in settings:
        width, _, height = settings["Size"].partition("x")
        if not (width.isdigit() and height.isdigit()):
            raise ValueError(f"Size: {settings['Size']!r}")
        options.update(width=int(width), height=int(height), image_size=None)
    if "Sampler" in settings:
        options["scheduler"] = scheduler_of(settings["Sampler"], settings.get("Schedule type"))
    return options


def scheduler_of(sampler: str, schedule: str | None) -> str | None:
    """The ``--scheduler`` name of an A1111 sampler and schedule type (``DPM++ 2M`` + ``Karras``), None when the
    tool has no such sampler (the model's own then runs). A1111's older names carry the schedule (``DPM++ 2M
    Karras``); schedule types the tool has not (``Exponential``) run the sampler's own."""
    if schedule is None and sampler.endswith(" Karras"):
        sampler, schedule = sampler.removesuffix(" Karras"), "Karras"
    karras = schedule == "Karras"
    for name, row in SAMPLERS.items():
        if row.a1111_sampler == sampler and bool(row.config.get("use_karras_sigmas")) == karras:
            return name
    return None
