"""A prompts file's rows as work items: each row's request (seed drawn or found, only missing images), its manifest
line and how its images are made and named. Shared by the local run (``jobs/run.py``) and Ray actors."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
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


# the most images one row may ask for (every pending image is a work item held in memory)
MAX_ROW_IMAGES = 100_000


@dataclasses.dataclass(frozen=True)
class RowWork:
    """One row's request (its seed drawn or found, only the images still missing) and its key: a digest of all that
    decides the row's pixels, so images made with other settings are never taken for this row's."""

    row: Row
    key: str
    request: GenerationRequest
    seed_drawn: bool = False  # no seed in the row nor --seed: drawn, or taken from the row's images in the folder

    @property
    def pending(self) -> int:
        return len(self.request.indices)

    def against(self, folder: JobFolder) -> RowWork:
        """This work with ``folder`` as it is now: a drawn seed replaced by the one the row's images there have, and
        only the images still missing (another run of the job may have made some meanwhile)."""
        seed = folder.seed_of(self.key) if self.seed_drawn else None
        request = self.request if seed is None else dataclasses.replace(self.request, seed=seed)
        missing = tuple(index for index in range(request.num_images) if not folder.complete(self.key, index))
        return dataclasses.replace(self, request=dataclasses.replace(request, image_indices=missing))


def pixel_identity(request: GenerationRequest, options: Options, *, build: str, seed: int | None) -> dict[str, Any]:
    """Everything that decides a row's pixels, whether the row or the command line gave it: the build (model,
    LoRAs, VAE, provider), every generation setting and the seed (None: drawn, found again by the key)."""
    identity = {
        "build": build,
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "steps": request.num_inference_steps,
        "guidance_scale": request.guidance_scale,
        "classifier_free_guidance": request.classifier_free_guidance,
        "scheduler": request.scheduler,
        "timestep_spacing": request.timestep_spacing,
        "size": [request.width, request.height],
        "seed": seed,
        "vae_tiling": options.vae_tiling or options.low_vram,
        "unoptimized": options.test_unoptimized,
    }
    if request.loras:  # only then: the keys of jobs without run-time LoRAs stay those earlier versions made
        identity["loras"] = [[lora.tensors_sha256 or lora.sha256, lora.scale] for lora in request.loras]
    if request.uses_cfg and request.cfg_cutoff < 1:  # likewise
        identity["cfg_cutoff"] = request.cfg_cutoff
    if request.cache_interval > 1:  # likewise
        identity["cache_interval"] = request.cache_interval
    return identity


def _digest(content: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]


def row_requests(options: Options, model, rows: list[Row], folder: JobFolder, *, build: str) -> list[RowWork]:
    """A request per row, checked against the model; a bad value is one line naming the file and the row.

    A row without a seed takes ``--seed`` on, in file order (the first such row ``--seed``, the next ``--seed`` plus
    the images before it, ...), or without ``--seed`` one drawn at random and recorded in its images' names.
    Identical rows are distinct work: the n-th copy of a row has a key of its own."""
    works = []
    copies: collections.Counter[str] = collections.Counter()
    next_seed = options.seed
    for row in rows:
        where = f"--prompts_file {options.prompts_file} row {row.number}"
        changes: dict[str, Any] = {"prompt": row.prompt, "prompts_file": None}
        changes.update({name: getattr(row, name) for name in ROW_OPTIONS if getattr(row, name) is not None})
        if row.width or row.height:
            changes["image_size"] = None
        num_images = changes.get("num_images", options.num_images)
        if num_images > MAX_ROW_IMAGES:
            raise UserInputError(f"{where}: num_images {num_images} is over {MAX_ROW_IMAGES:,}; split the row")
        if "seed" not in changes and next_seed is not None:
            changes["seed"] = next_seed
            next_seed += num_images
        seed = changes.get("seed")
        if seed is not None and seed + num_images - 1 > MAX_SEED:
            raise UserInputError(
                f"{where}: seed {seed} with {num_images} image(s) runs past the largest seed {MAX_SEED}"
            )
        try:
            request = generation_request(dataclasses.replace(options, **{**changes, "seed": seed or 0}), model)
        except UserInputError as error:
            raise UserInputError(f"{where}: {error}") from None
        identity = pixel_identity(request, options, build=build, seed=seed)
        key = first_copy = _digest(identity)
        if copies[first_copy]:
            key = _digest({**identity, "copy": copies[first_copy]})
        copies[first_copy] += 1
        if seed is None:
            found = folder.seed_of(key)
            seed = found if found is not None else secrets.randbelow(MAX_SEED - num_images)
        work = RowWork(row, key, dataclasses.replace(request, seed=seed), seed_drawn="seed" not in changes)
        works.append(work.against(folder))
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
        "timestep_spacing": request.timestep_spacing,
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
