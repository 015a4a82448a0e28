"""Where a prompt becomes PNG files: load the ONNX pipeline with ONNX Runtime, run it in batches, save the images.

The denoising loop itself is optimum's ``ORTStableDiffusionXLPipeline`` (diffusers' SDXL pipeline over ORT sessions),
so scheduler maths, prompt encoding and time ids are the reference ones.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .model_spec import ModelSpec, Shape, free_dimension_overrides
from .providers import Provider, session_options, session_providers

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One run: ``num_images`` images of ``prompt`` in calls of ``batch_size`` images each."""

    prompt: str
    negative_prompt: str | None
    num_images: int
    batch_size: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    width: int
    height: int
    classifier_free_guidance: bool = True

    @property
    def num_calls(self) -> int:
        return math.ceil(self.num_images / self.batch_size)

    @property
    def uses_cfg(self) -> bool:
        """diffusers' rule (``do_classifier_free_guidance``): guidance only above 1."""
        return self.classifier_free_guidance and self.guidance_scale > 1

    @property
    def shape(self) -> Shape:
        return Shape(
            batch=self.batch_size, height=self.height, width=self.width, classifier_free_guidance=self.uses_cfg
        )

    def image_seed(self, index: int) -> int:
        """Image ``index`` of the run gets its own seed, so any image can be regenerated alone with ``--seed``."""
        return self.seed + index


@dataclasses.dataclass(frozen=True)
class GeneratedImage:
    path: Path
    seed: int
    index: int


@dataclasses.dataclass(frozen=True)
class LoadedPipeline:
    pipeline: Any  # optimum ORTStableDiffusionXL(Img2Img)Pipeline
    spec: ModelSpec
    folder: Path
    provider: Provider
    shape: Shape | None  # the static shape the sessions are pinned to; None with --dynamic_dims
    model_label: str


def load_pipeline(
    folder: Path,
    spec: ModelSpec,
    *,
    provider: Provider,
    device_id: int = 0,
    shape: Shape | None,
    model_label: str,
) -> LoadedPipeline:
    """Create ORT sessions for the pipeline folder; ``shape`` pins every symbolic dim (static shapes)."""
    from optimum.onnxruntime import ORTStableDiffusionXLImg2ImgPipeline, ORTStableDiffusionXLPipeline

    cls = ORTStableDiffusionXLImg2ImgPipeline if spec.is_refiner else ORTStableDiffusionXLPipeline
    providers, provider_options = session_providers(provider, device_id)
    overrides = free_dimension_overrides(spec, shape) if shape is not None else None
    logger.info(
        "loading %s with %s%s",
        folder,
        provider.execution_provider,
        f" (static shapes: batch {shape.batch}, {shape.width}x{shape.height})" if shape else "",
    )
    pipeline = cls.from_pretrained(
        folder,
        export=False,
        providers=providers,
        provider_options=provider_options,
        session_options=session_options(provider, overrides),
    )
    return LoadedPipeline(pipeline, spec, folder, provider, shape, model_label)


StepCallback = Callable[[int, int], None]  # (steps done in the run, total steps of the run)
ImageCallback = Callable[[GeneratedImage], None]


def text_to_image(
    loaded: LoadedPipeline,
    request: GenerationRequest,
    *,
    output_dir: Path,
    on_step: StepCallback | None = None,
    on_image: ImageCallback | None = None,
    latents: Any = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[GeneratedImage]:
    """Generate ``request.num_images`` images in ``request.num_calls`` pipeline calls and save them as PNG.

    ``latents`` (torch, ``(num_images, C, H/f, W/f)``) replaces the seeded noise, for tests and hand-offs.
    With static shapes every call runs at the pinned batch size: a short last batch is padded with extra seeds whose
    images are dropped. ``should_stop`` is polled after every step; a stopped run saves nothing more.
    """
    import torch

    output_dir.mkdir(parents=True, exist_ok=True)
    total_steps = request.num_calls * request.num_inference_steps
    saved: list[GeneratedImage] = []
    steps_done = 0
    for call in range(request.num_calls):
        first = call * request.batch_size
        count = min(request.batch_size, request.num_images - first)
        run_count = request.batch_size if loaded.shape is not None else count
        indices = list(range(first, first + run_count))
        generators = [torch.Generator().manual_seed(request.image_seed(i)) for i in indices]
        call_latents = None
        if latents is not None:
            call_latents = latents[first : first + count]
            if run_count > count:
                call_latents = torch.cat([call_latents, call_latents[-1:].expand(run_count - count, -1, -1, -1)])

        def step_end(pipe, step, timestep, callback_kwargs, _base=steps_done):
            if on_step is not None:
                on_step(_base + step + 1, total_steps)
            if should_stop is not None and should_stop():
                pipe._interrupt = True  # diffusers' own way to leave the denoising loop early
            return callback_kwargs

        images = loaded.pipeline(
            prompt=[request.prompt] * run_count,
            negative_prompt=[request.negative_prompt] * run_count if request.negative_prompt else None,
            height=request.height,
            width=request.width,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale if request.uses_cfg else 1.0,
            generator=generators,
            latents=call_latents,
            callback_on_step_end=step_end,
        ).images
        steps_done += request.num_inference_steps
        if should_stop is not None and should_stop():
            logger.info("stopped before saving the images of call %d", call + 1)
            break
        for offset, image in enumerate(images[:count]):
            index = first + offset
            seed = request.image_seed(index)
            path = save_png(image, output_dir, seed=seed, metadata=png_metadata(loaded, request, seed))
            generated = GeneratedImage(path=path, seed=seed, index=index)
            saved.append(generated)
            logger.info("saved %s", path)
            if on_image is not None:
                on_image(generated)
    return saved


def png_metadata(loaded: LoadedPipeline, request: GenerationRequest, seed: int) -> dict[str, str]:
    """Generation parameters stored as PNG text chunks (readable with ``PIL.Image.open(p).text``)."""
    return {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt or "",
        "seed": str(seed),
        "num_inference_steps": str(request.num_inference_steps),
        "guidance_scale": str(request.guidance_scale if request.uses_cfg else 1.0),
        "width": str(request.width),
        "height": str(request.height),
        "model": loaded.model_label,
        "provider": loaded.provider.name,
        "software": "sdxl-olive",
    }


_NAME = re.compile(r"^(\d{5})-")


def save_png(image, output_dir: Path, *, seed: int, metadata: dict[str, str]) -> Path:
    """Save ``image`` as ``NNNNN-<seed>.png``, NNNNN one above the highest number already in ``output_dir``.

    The file is written under a temporary name and hard-linked into place, which fails rather than overwrite: no
    existing image is ever replaced and no half-written PNG appears under a final name.
    """
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)
    handle, temporary = tempfile.mkstemp(prefix=".partial-", suffix=".png", dir=output_dir)
    os.close(handle)
    try:
        image.save(temporary, pnginfo=info)
        number = 1 + max((int(m.group(1)) for p in output_dir.iterdir() if (m := _NAME.match(p.name))), default=-1)
        while True:
            path = output_dir / f"{number:05d}-{seed}.png"
            try:
                os.link(temporary, path)
                return path
            except FileExistsError:
                number += 1
    finally:
        os.unlink(temporary)
