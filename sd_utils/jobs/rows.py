"""A prompts file's rows as work items: each row's request (seed drawn or found, only missing images), its manifest
line and how its images are made and named. Shared by the local run (``jobs/run.py``) and Ray actors."""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path
from typing import Any

from sd_utils.app import generation_request
from sd_utils.errors import UserInputError
from sd_utils.generation.output import save_png_as
from sd_utils.generation.request import GeneratedImage, GenerationRequest
from sd_utils.jobs.manifest import JobFolder, image_name
from sd_utils.jobs.prompts_file import Row
from sd_utils.options import MAX_SEED, Options

# the row fields that stand in for the command line's options of the same name
ROW_OPTIONS = (
    "negative_prompt", "seed", "num_images", "num_inference_steps", "guidance_scale", "width", "height", "scheduler",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RowWork:
    """One row's request (its seed drawn or found, only the images still missing) and its key."""

    row: Row
    key: str
    request: GenerationRequest

    @property
    def pending(self) -> int:
        return len(self.request.indices)


def row_requests(options: Options, model, rows: list[Row], folder: JobFolder) -> list[RowWork]:
    """A request per row, checked against the model; a bad value is one line naming the file and the row."""
    works = []
    for row in rows:
        changes: dict[str, Any] = {"prompt": row.prompt, "prompts_file": None}
        changes.update({name: getattr(row, name) for name in ROW_OPTIONS if getattr(row, name) is not None})
        if row.width or row.height:
            changes["image_size"] = None
        seed = changes.get("seed", folder.seed_of(row.key))
        num_images = changes.get("num_images", options.num_images)
        changes["seed"] = seed if seed is not None else secrets.randbelow(MAX_SEED - num_images)
        try:
            request = generation_request(dataclasses.replace(options, **changes), model)
        except UserInputError as error:
            raise UserInputError(f"--prompts_file {options.prompts_file} row {row.number}: {error}") from None
        missing = tuple(index for index in range(request.num_images) if not folder.complete(row.key, index))
        works.append(RowWork(row, row.key, dataclasses.replace(request, image_indices=missing)))
    return works


def manifest_entry(work: RowWork, image: GeneratedImage, *, model: str, build: str, provider: str, seconds) -> dict:
    request = work.request
    return {
        "file": image.path.name,
        "row": work.row.number,
        "key": work.key,
        "image_index": image.index,
        "seed": image.seed,
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "num_inference_steps": request.num_inference_steps,
        "guidance_scale": request.guidance_scale,
        "width": request.width,
        "height": request.height,
        "scheduler": request.scheduler,
        "model": model,
        "build": build,
        "provider": provider,
        "seconds": seconds,
    }


def run_row(generate, work: RowWork, output_dir: Path, *, on_image) -> list[GeneratedImage]:
    """Make the row's missing images with ``generate`` (a Generator's), each saved under its job name."""

    def saver(image, folder: Path, index: int, seed: int, metadata: dict[str, str]) -> Path:
        return save_png_as(image, folder / image_name(work.row.number, work.key, index, seed), metadata=metadata)

    return generate(work.request, saver=saver, on_image=on_image, output_dir=output_dir)
