"""The run loop: a request becomes PNG files, in named steps (plan batches -> encode prompt -> denoise -> check ->
save).

The denoising loops themselves are optimum's ``ORTStableDiffusionXL(Img2Img)Pipeline`` (diffusers' SDXL pipelines
over ORT sessions), so scheduler maths, prompt encoding and time ids are the reference ones. This module adds what a
tool needs around them: exactly ``num_images`` files in calls of ``batch_size``, one seed per image, padding for
static shapes, safety-checker retries, progress and stop callbacks.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sd_utils.errors import DiskFullError, SafetyCheckError
from sd_utils.files import disk_full
from sd_utils.generation.cfg_cutoff import drop_guidance
from sd_utils.generation.output import png_metadata, save_png, to_pil_images
from sd_utils.generation.prompts import encode_prompt
from sd_utils.generation.request import GeneratedImage, GenerationRequest, ImageCallback, Saver, StepCallback
from sd_utils.generation.schedulers import make_scheduler
from sd_utils.runtime.optimum_adapter import interrupt
from sd_utils.runtime.pipeline import LoadedPipeline
from sd_utils.runtime.providers import memory_errors

logger = logging.getLogger(__name__)

Slot = tuple[int, int]  # (image index in the run, seed)


@dataclasses.dataclass(frozen=True)
class CallInputs:
    """What one pipeline call gets: the run's image indices (padding included), their generators and latents."""

    indices: list[int]
    generators: list[Any]
    latents: Any
    step_end: Callable


class BatchPlan:
    """The slots still to fill, in batches of the request's size. A flagged image goes back in with a fresh seed,
    past the run's range, at most ``max_retries`` times."""

    def __init__(self, request: GenerationRequest, *, padded: bool, max_retries: int):
        self.request, self.padded, self.max_retries = request, padded, max_retries
        self.pending: list[Slot] = [(index, request.image_seed(index)) for index in request.indices]
        self.fresh_seeds = itertools.count(request.image_seed(request.num_images))
        self.retries: collections.Counter[int] = collections.Counter()
        self.given_up: list[int] = []
        self.calls_done = 0

    def batches(self) -> Iterator[list[Slot]]:
        while self.pending:
            batch, self.pending = self.pending[: self.request.batch_size], self.pending[self.request.batch_size :]
            yield batch
            self.calls_done += 1

    def slots(self, batch: list[Slot]) -> list[Slot]:
        """``batch`` padded to the pinned batch size with extra seeds, whose images are dropped."""
        slots = list(batch)
        while self.padded and len(slots) < self.request.batch_size:
            slots.append((slots[-1][0], next(self.fresh_seeds)))
        return slots

    def total_steps(self) -> int:
        """The run's denoising steps as known now (retries add calls)."""
        calls = self.calls_done + 1 + math.ceil(len(self.pending) / self.request.batch_size)
        return calls * self.request.steps_per_call

    def flagged(self, index: int, seed: int) -> None:
        self.retries[index] += 1
        if self.retries[index] > self.max_retries:
            self.given_up.append(index)
            logger.warning(
                "image %d was flagged by the safety checker %d times: giving it up", index, self.retries[index]
            )
        else:
            self.pending.append((index, next(self.fresh_seeds)))
            logger.info("image %d (seed %d) was flagged by the safety checker: regenerating", index, seed)


def _common_arguments(loaded: LoadedPipeline, request: GenerationRequest, call: CallInputs) -> dict[str, Any]:
    cutoff = {}
    if request.cfg_cutoff < 1:  # the step callback hands back the loop's tensors without their CFG half
        cutoff["callback_on_step_end_tensor_inputs"] = list(loaded.pipeline._callback_tensor_inputs)
    return {
        **encode_prompt(loaded, request, len(call.indices)),
        "num_inference_steps": request.num_inference_steps,
        "guidance_scale": request.effective_guidance_scale,
        "generator": call.generators,
        "callback_on_step_end": call.step_end,
        **cutoff,
    }


def _run(loaded: LoadedPipeline, **arguments) -> Any:
    """One pipeline call; its images as PIL images, or its latents when ``output_type="latent"`` is asked for."""
    decode = "output_type" not in arguments
    if decode:
        arguments["output_type"] = "pt"  # the decoded image, still where the VAE left it: see to_pil_images
    images = loaded.pipeline(**arguments).images
    return to_pil_images(images) if decode else images


def _control(request: GenerationRequest, image_key: str) -> dict[str, Any]:
    """The ControlNet arguments of a call (none without ``--controlnet``)."""
    return request.control.arguments(image_key) if request.control is not None else {}


def _text_to_image_call(loaded: LoadedPipeline, request: GenerationRequest, call: CallInputs) -> list[Any]:
    return _run(
        loaded,
        height=request.height,
        width=request.width,
        latents=call.latents,
        **_control(request, "image"),
        **_common_arguments(loaded, request, call),
    )


def _refine_call(loaded: LoadedPipeline, request: GenerationRequest, call: CallInputs) -> list[Any]:
    refine = request.refine
    images = [refine.images[index % len(refine.images)].image for index in call.indices]
    if refine.masks:
        masks = [refine.masks[index % len(refine.masks)].image for index in call.indices]
        size = {"height": request.height, "width": request.width}  # the inpainting pipeline's own size arguments
        return _run(loaded, image=images, mask_image=masks, **size, **_image_to_image_arguments(loaded, request, call))
    return _run(loaded, image=images, **_image_to_image_arguments(loaded, request, call))


def _image_to_image_arguments(loaded: LoadedPipeline, request: GenerationRequest, call: CallInputs) -> dict[str, Any]:
    refine = request.refine
    return dict(
        **_control(request, "control_image"),
        strength=refine.strength,
        aesthetic_score=refine.aesthetic_score,
        negative_aesthetic_score=refine.negative_aesthetic_score,
        **_common_arguments(loaded, request, call),
    )


def _ensemble_call(base: LoadedPipeline, refiner: LoadedPipeline, request: GenerationRequest, call: CallInputs):
    """SDXL's "ensemble of experts": the base denoises the first ``high_noise_frac`` of the schedule and hands its
    latents (no decode, no PNG) to the refiner, which finishes the schedule."""
    latents = _run(
        base,
        height=request.height,
        width=request.width,
        latents=call.latents,
        output_type="latent",
        denoising_end=request.high_noise_frac,
        **_control(request, "image"),
        **_common_arguments(base, request, call),
    )
    return _run(
        refiner, image=latents, denoising_start=request.high_noise_frac, **_common_arguments(refiner, request, call)
    )


def use_scheduler(loaded: LoadedPipeline, request: GenerationRequest) -> None:
    """Give the pipeline the request's scheduler, made from the model's own scheduler config (diffusers' documented
    way to change a pipeline's sampler: assign ``pipeline.scheduler``)."""
    loaded.pipeline.scheduler = make_scheduler(loaded.scheduler_config, request.scheduler, request.timestep_spacing)


def pipeline_call(
    loaded: LoadedPipeline, request: GenerationRequest, refiner: LoadedPipeline | None
) -> Callable[[CallInputs], list[Any]]:
    """The request's mode: refinement of base images, base -> ``refiner`` hand-off, or text-to-image."""
    if request.refine is not None:
        return lambda call: _refine_call(loaded, request, call)
    if refiner is not None:
        return lambda call: _ensemble_call(loaded, refiner, request, call)
    return lambda call: _text_to_image_call(loaded, request, call)


def _call_inputs(
    plan: BatchPlan,
    batch: list[Slot],
    *,
    latents: Any,
    step_end: Callable,
) -> CallInputs:
    """Generators (one per image seed) and, for first attempts, the caller's ``latents`` rows of the batch."""
    import torch

    request = plan.request
    slots = plan.slots(batch)
    call_latents = None
    if latents is not None and all(request.image_seed(index) == seed for index, seed in batch):
        call_latents = torch.stack([latents[index] for index, _ in slots])
    return CallInputs(
        indices=[index for index, _ in slots],
        generators=[torch.Generator().manual_seed(seed) for _, seed in slots],
        latents=call_latents,
        step_end=step_end,
    )


def _step_end(plan: BatchPlan, steps: Iterator[int], on_step: StepCallback | None, should_stop) -> Callable:
    """diffusers' ``callback_on_step_end``: progress over the whole run, the stop request, ``--cfg_cutoff``."""
    total = plan.total_steps()

    def step_end(pipe, step, timestep, callback_kwargs):
        if on_step is not None:
            on_step(min(next(steps), total), total)
        if should_stop is not None and should_stop():
            interrupt(pipe)
        return drop_guidance(pipe, step, plan.request.cfg_cutoff, callback_kwargs)

    return step_end


def _denoise(loaded: LoadedPipeline, request: GenerationRequest, run_call, call: CallInputs, *, saved: int) -> list:
    """One pipeline call, its out-of-memory error worded with what to lower."""
    making = (
        f"making {request.width}x{request.height} images in batches of {request.batch_size} "
        f"(images saved so far: {saved} of {request.num_images})"
    )
    fix = "lower --width/--height or --batch_size"
    if request.refine is not None:  # the VAE encoder runs on the base images' size
        fix = "use smaller --base_images (or --width/--height), or a lower --batch_size"
    elif loaded.provider.olive_device == "gpu" and not loaded.low_vram:
        fix += ", or add --low_vram"
    elif not loaded.vae_tiling:
        fix += ", or add --vae_tiling"
    if loaded.unet_cache is not None:  # DeepCache: the call's first step refreshes the cache
        loaded.unet_cache.start(request.cache_interval)
    with memory_errors(loaded.provider, making, fix):
        return run_call(call)


def _check(loaded: LoadedPipeline, safety_checker, images: list) -> list[bool]:
    """Which of ``images`` the safety checker flags (none without one)."""
    if safety_checker is None:
        return [False] * len(images)
    with memory_errors(loaded.provider, "checking images with the safety checker", "lower --batch_size"):
        return safety_checker(images)


def numbered_png(image, output_dir: Path, index: int, seed: int, metadata: dict[str, str]) -> Path:
    """The default :data:`Saver`: ``NNNNN-<seed>.png``, never overwriting."""
    return save_png(image, output_dir, seed=seed, metadata=metadata)


def generate_images(
    loaded: LoadedPipeline,
    request: GenerationRequest,
    *,
    output_dir: Path,
    refiner: LoadedPipeline | None = None,
    on_step: StepCallback | None = None,
    on_image: ImageCallback | None = None,
    latents: Any = None,
    should_stop: Callable[[], bool] | None = None,
    safety_checker: Callable[[list[Any]], list[bool]] | None = None,
    max_safety_retries: int = 3,
    saver: Saver | None = None,
) -> list[GeneratedImage]:
    """Make ``request.num_images`` images in ``request.num_calls`` pipeline calls and save them as PNG.

    With a ``safety_checker``, flagged images are never written: each is regenerated with a fresh seed, at most
    ``max_safety_retries`` times, after which :class:`SafetyCheckError` says how many could not be produced (the safe
    ones are saved). ``latents`` (torch, ``(num_images, C, H/f, W/f)``) replaces the seeded initial noise of first
    attempts, for tests and hand-offs. ``should_stop`` is polled after every step; a stopped run saves nothing more.
    ``saver`` writes each image (default: the next free ``NNNNN-<seed>.png``, see :func:`save_png`).
    """
    saver = saver or numbered_png
    for pipeline in filter(None, (loaded, refiner)):
        use_scheduler(pipeline, request)
    run_call = pipeline_call(loaded, request, refiner)
    output_dir.mkdir(parents=True, exist_ok=True)
    plan = BatchPlan(request, padded=loaded.shape is not None, max_retries=max_safety_retries)
    steps = itertools.count(1)  # every step of every pipeline of the run (base, then refiner of a hand-off)
    saved: list[GeneratedImage] = []
    for batch in plan.batches():
        call = _call_inputs(plan, batch, latents=latents, step_end=_step_end(plan, steps, on_step, should_stop))
        images = _denoise(loaded, request, run_call, call, saved=len(saved))[: len(batch)]
        if should_stop is not None and should_stop():
            logger.info("stopped: the images of call %d are not saved", plan.calls_done + 1)
            break
        for (index, seed), image, flagged in zip(batch, images, _check(loaded, safety_checker, images), strict=True):
            if flagged:
                plan.flagged(index, seed)
                continue
            metadata = png_metadata(loaded, request, seed=seed, index=index, refiner=refiner)
            try:
                generated = GeneratedImage(saver(image, output_dir, index, seed, metadata), seed, index)
            except OSError as error:
                if not disk_full(error):
                    raise
                raise DiskFullError(
                    f"the disk of {output_dir} is full: {len(saved)} of {request.num_images} image(s) saved there; "
                    "free some space (or use another --output_dir) and run again"
                ) from error
            saved.append(generated)
            logger.debug("saved %s", generated.path)  # the CLI says "Generated <png>" (the window shows it)
            if on_image is not None:
                on_image(generated)
    if plan.given_up:
        raise SafetyCheckError(
            f"{len(plan.given_up)} of {request.num_images} image(s) were flagged by the safety checker "
            f"{max_safety_retries + 1} times and were not written ({len(saved)} saved); raise --max_safety_retries "
            "or change the prompt"
        )
    return saved
