"""What one run asks for (:class:`GenerationRequest`) and what it produced (:class:`GeneratedImage`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

from sd_utils.generation.base_images import BaseImage
from sd_utils.sources.model_spec import Shape


@dataclasses.dataclass(frozen=True)
class RefineSettings:
    """Image-to-image (a base model's img2img, or a refiner's): base image ``i % len(images)`` becomes output image
    ``i``; with ``masks``, inpainting: mask ``i % len(masks)`` says what is repainted (white) and what is kept."""

    images: tuple[BaseImage, ...]
    strength: float = 0.3
    aesthetic_score: float = 6.0  # read by refiners only (requires_aesthetics_score)
    negative_aesthetic_score: float = 2.5
    masks: tuple[BaseImage, ...] = ()

    @property
    def task(self) -> str:
        return "inpaint" if self.masks else "img2img"


@dataclasses.dataclass(frozen=True)
class ControlSettings:
    """ControlNets for a run: each with its scale (``sources.controlnet.ControlNetSource``) and its control image
    (``generation.control_images.ControlImage``), applied from fraction ``start`` to ``end`` of the steps."""

    nets: tuple = ()
    images: tuple = ()
    start: float = 0.0
    end: float = 1.0
    canny: tuple[int, int] = (100, 200)  # the thresholds, when the images were made with canny

    def arguments(self, image_key: str) -> dict:
        """diffusers' ControlNet pipeline arguments: the maps under ``image_key`` (``image`` for text-to-image,
        ``control_image`` for image-to-image), one scale and one start/end per ControlNet."""
        count = len(self.nets)
        return {
            image_key: [control.image for control in self.images],
            "controlnet_conditioning_scale": [net.scale for net in self.nets],
            "control_guidance_start": [self.start] * count,
            "control_guidance_end": [self.end] * count,
        }


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
    scheduler: str | None = None  # a --scheduler name (generation/schedulers.py); None: the model's own
    timestep_spacing: str | None = None
    refine: RefineSettings | None = None
    high_noise_frac: float | None = None  # base -> refiner hand-off point ("ensemble of experts")
    image_indices: tuple[int, ...] | None = None  # which of the run's images to make (a resumed job); None: all
    text_chunks: int = 1  # the prompts' chunks of 77 tokens (see generation/prompt_syntax.py), set before a run
    # run-time LoRAs (sources.lora.LoraFile, each with its scale): --lora and the prompt's <lora:name:w> tags
    loras: tuple = ()
    control: ControlSettings | None = None  # --controlnet: the ControlNets and their control images
    cfg_cutoff: float = 1.0  # guidance for this fraction of each call's steps only (generation/cfg_cutoff.py)
    cache_interval: int = 1  # DeepCache: the full UNet on every N-th step of a call only (runtime/deep_cache.py)

    @property
    def task(self) -> str:
        """Which optimum pipeline runs the request: ``text2img``, ``img2img`` or ``inpaint``."""
        return self.refine.task if self.refine is not None else "text2img"

    @property
    def indices(self) -> tuple[int, ...]:
        return tuple(range(self.num_images)) if self.image_indices is None else self.image_indices

    @property
    def num_calls(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    @property
    def uses_cfg(self) -> bool:
        """diffusers' rule (``do_classifier_free_guidance``): guidance only above 1."""
        return self.classifier_free_guidance and self.guidance_scale > 1

    @property
    def effective_guidance_scale(self) -> float:
        return self.guidance_scale if self.uses_cfg else 1.0

    @property
    def shape(self) -> Shape:
        return Shape(
            batch=self.batch_size,
            height=self.height,
            width=self.width,
            classifier_free_guidance=self.uses_cfg,
            text_chunks=self.text_chunks,
            free_batch=self.uses_cfg and self.cfg_cutoff < 1,
        )

    @property
    def steps_per_call(self) -> int:
        """Denoising steps one pipeline call runs (img2img skips the first ``1 - strength`` of the schedule)."""
        if self.refine is not None:
            return min(int(self.num_inference_steps * self.refine.strength), self.num_inference_steps)
        return self.num_inference_steps

    def image_seed(self, index: int) -> int:
        """Image ``index`` of the run gets its own seed, so any image can be regenerated alone with ``--seed``."""
        return self.seed + index


@dataclasses.dataclass(frozen=True)
class GeneratedImage:
    path: Path
    seed: int
    index: int


StepCallback = Callable[[int, int], None]  # (steps done in the run, total steps of the run)
ImageCallback = Callable[[GeneratedImage], None]
# writes one image: (PIL image, output folder, image index, seed, PNG text chunks) -> the file written
Saver = Callable[[object, Path, int, int, dict[str, str]], Path]
