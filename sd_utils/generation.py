"""Where a prompt becomes PNG files: load the ONNX pipeline with ONNX Runtime, run it in batches, save the images.

The denoising loops themselves are optimum's ``ORTStableDiffusionXL(Img2Img)Pipeline`` (diffusers' SDXL pipelines
over ORT sessions), so scheduler maths, prompt encoding and time ids are the reference ones. This module adds what a
tool needs around them: batching into exactly ``num_images`` files, per-image seeds, static shapes, prompts encoded
once per run (and the text encoders dropped after it with ``low_vram``), progress and stop callbacks, and safe PNG
writing with the parameters as metadata.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .base_images import BaseImage
from .cuda_graph import CudaGraphUNet, cuda_graph_session, use_cuda_graph_unet
from .errors import SafetyCheckError
from .model_spec import ModelSpec, Shape, free_dimension_overrides, submodel_io
from .providers import (
    Provider,
    check_session_provider,
    memory_errors,
    new_session,
    out_of_memory,
    session_options,
    session_providers,
    share_arena,
)
from .vae_tiling import tiled_shape, use_tiled_vae_decoder

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RefineSettings:
    """Image-to-image with a refiner: base image ``i % len(images)`` is refined into output image ``i``."""

    images: tuple[BaseImage, ...]
    strength: float = 0.3
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5


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
    refine: RefineSettings | None = None
    high_noise_frac: float | None = None  # base -> refiner hand-off point ("ensemble of experts")

    @property
    def num_calls(self) -> int:
        return math.ceil(self.num_images / self.batch_size)

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
            batch=self.batch_size, height=self.height, width=self.width, classifier_free_guidance=self.uses_cfg
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


@dataclasses.dataclass(frozen=True)
class LoadedPipeline:
    pipeline: Any  # optimum ORTStableDiffusionXL(Img2Img)Pipeline
    spec: ModelSpec
    folder: Path
    provider: Provider
    shape: Shape | None  # the static shape the sessions are pinned to; None with --dynamic_dims
    model_label: str
    unet_graph: CudaGraphUNet | None = None  # the UNet replayed as a CUDA graph, when it is
    vae_tiling: bool = False  # the VAE decoder decodes tile by tile (sd_utils/vae_tiling.py)
    low_vram: bool = False  # the text encoders exist only while they encode a prompt (see encode_prompt)
    # a new text encoder part (optimum's) of ``folder``, its session made as load_pipeline made the others
    new_text_encoder: Callable[[str], Any] | None = None
    # the last prompt's embeddings, by (prompt, negative prompt, images per call, CFG): see encode_prompt
    prompt_embeddings: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)


def load_pipeline(
    folder: Path,
    spec: ModelSpec,
    *,
    provider: Provider,
    device_id: int = 0,
    shape: Shape | None,
    model_label: str,
    use_io_binding: bool | None = None,
    cuda_graph: bool | None = None,
    vae_tiling: bool = False,
    low_vram: bool = False,
) -> LoadedPipeline:
    """Create ORT sessions for the pipeline folder; ``shape`` pins every symbolic dim (static shapes).

    ``use_io_binding`` (default: on for GPU providers that optimum can bind, i.e. CUDA) keeps the denoising loop's
    tensors on the device: no host round trip per step. ``cuda_graph`` (default: on for CUDA with static shapes)
    replays the UNet as a CUDA graph instead of launching its kernels one by one; a UNet that cannot be captured
    (some node not on the CUDA EP) runs as usual, with a warning. ``vae_tiling`` decodes tile by tile, the
    decoder's dims pinned to the tile's shape. ``low_vram`` frees the text encoders' memory after they have encoded
    the prompt (:func:`encode_prompt`) and drops a base model's VAE encoder, which text-to-image never runs.
    """
    from optimum.onnxruntime import ORTStableDiffusionXLImg2ImgPipeline, ORTStableDiffusionXLPipeline

    cls = ORTStableDiffusionXLImg2ImgPipeline if spec.is_refiner else ORTStableDiffusionXLPipeline
    providers, provider_options = session_providers(provider, device_id)
    overrides = free_dimension_overrides(spec, shape) if shape is not None else None
    if overrides is not None and vae_tiling:
        overrides.update(submodel_io(spec, "vae_decoder").dim_values(tiled_shape(spec, shape)))
    options = session_options(provider, overrides)
    io_binding = provider.io_binding if use_io_binding is None else use_io_binding
    static = f" (static shapes: batch {shape.batch}, {shape.width}x{shape.height})" if shape else ""
    cuda_graph = (True if cuda_graph is None else cuda_graph) and provider.cuda_graph and shape is not None
    with memory_errors(provider, f"loading {folder}", "" if provider.name == "cpu" else "use --provider cpu"):
        share_arena(provider, device_id)
        runner = _cuda_graph_unet(folder, provider, device_id, options) if cuda_graph else None
        graphed = " (UNet as a CUDA graph)" if runner else ""
        logger.info("loading %s with %s%s%s", folder, provider.execution_provider, static, graphed)
        pipeline = cls.from_pretrained(
            folder,
            export=False,
            providers=providers,
            provider_options=provider_options,
            session_options=options,
            use_io_binding=io_binding,
            **({"unet_session": runner.session} if runner else {}),
        )
    for part in pipeline.parts:
        check_session_provider(part.session, provider, str(part.path.parent))
    if runner:
        use_cuda_graph_unet(pipeline, runner)
    if vae_tiling:
        use_tiled_vae_decoder(pipeline, spec)
    if low_vram and not spec.is_refiner:
        _drop_parts(pipeline, ["vae_encoder"])

    def new_text_encoder(name: str):
        from optimum.onnxruntime.modeling_diffusion import ORTTextEncoder

        session = new_session(str(folder / name / "model.onnx"), provider, device_id, overrides)
        check_session_provider(session, provider, str(folder / name))
        return ORTTextEncoder(session, pipeline, io_binding)

    return LoadedPipeline(
        pipeline,
        spec,
        folder,
        provider,
        shape,
        model_label,
        unet_graph=runner,
        vae_tiling=vae_tiling,
        low_vram=low_vram,
        new_text_encoder=new_text_encoder,
    )


# the pipeline's text encoders, in the order diffusers runs them (a refiner has only the second)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# what diffusers' ``encode_prompt`` returns, by the names its pipelines take them under
PROMPT_EMBEDDINGS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


def encode_prompt(loaded: LoadedPipeline, request: GenerationRequest, count: int) -> dict[str, Any]:
    """The embeddings of ``request``'s prompts for a pipeline call of ``count`` images, as the call's keyword arguments.

    diffusers' own ``encode_prompt`` runs the text encoders; here it runs once per prompt, not in every call of a run
    (and not again when a later run, in the window, has the same prompts). With ``low_vram`` the text encoders'
    sessions are made for it and dropped after it, so their weights (1.5 GiB for SDXL in fp16) are free while the
    UNet and the VAE decoder run; a new prompt makes them again.
    """
    key = (request.prompt, request.negative_prompt, count, request.uses_cfg)
    if key in loaded.prompt_embeddings:
        return loaded.prompt_embeddings[key]
    loaded.prompt_embeddings.clear()
    try:
        _open_text_encoders(loaded)
        with warnings.catch_warnings():
            # optimum's text encoder reads its config through the attribute diffusers deprecates
            warnings.filterwarnings("ignore", message="Accessing config attribute", category=FutureWarning)
            embeddings = loaded.pipeline.encode_prompt(
                prompt=[request.prompt] * count,
                negative_prompt=[request.negative_prompt] * count if request.negative_prompt else None,
                do_classifier_free_guidance=request.uses_cfg,
            )
    finally:
        if loaded.low_vram:  # also after a failure: what was made for it goes again
            _drop_parts(loaded.pipeline, TEXT_ENCODERS)
    loaded.prompt_embeddings[key] = dict(zip(PROMPT_EMBEDDINGS, embeddings, strict=True))
    return loaded.prompt_embeddings[key]


def _open_text_encoders(loaded: LoadedPipeline) -> None:
    """Make the text-encoder sessions that ``low_vram`` dropped after the last prompt."""
    pipeline = loaded.pipeline
    missing = [name for name in TEXT_ENCODERS if name in loaded.spec.submodels and getattr(pipeline, name) is None]
    if not missing:
        return
    # the memory the last images' tensors took stays with ONNX Runtime, and each new session needs some beside it:
    # with 9 GiB free the second prompt of a 1024² window ran out here (bench/NOTES.md, run 13)
    doing = "loading the text encoders again for a new prompt (--low_vram)"
    with memory_errors(loaded.provider, doing, "keep the last prompt, or restart to start from free memory"):
        for name in missing:
            part = loaded.new_text_encoder(name)
            setattr(pipeline, name, part)
            pipeline.parts.append(part)


def _drop_parts(pipeline, names) -> None:
    """Remove the sessions of the pipeline's parts ``names``, so that ONNX Runtime frees their memory now."""
    for name in names:
        part = getattr(pipeline, name)
        if part is None:
            continue
        pipeline.parts.remove(part)
        if part is pipeline.vae.encoder:  # optimum's VAE wraps both halves
            pipeline.vae.parts.remove(part)
            pipeline.vae.encoder = None
        setattr(pipeline, name, None)  # the last reference: the session goes now (a test checks it)


def _cuda_graph_unet(folder: Path, provider: Provider, device_id: int, options) -> CudaGraphUNet | None:
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    try:
        session, stream = cuda_graph_session(
            folder / "unet" / "model.onnx",
            device_id=device_id,
            sess_options=options,
            extra_options=dict(provider.options),
        )
    except Fail as error:  # ORT refuses graph capture when some node would run outside the CUDA EP
        if out_of_memory(error):
            raise
        logger.warning("the UNet runs without a CUDA graph: %s", str(error).strip().splitlines()[0])
        return None
    return CudaGraphUNet(session, stream, device_id=device_id)


StepCallback = Callable[[int, int], None]  # (steps done in the run, total steps of the run)
ImageCallback = Callable[[GeneratedImage], None]


@dataclasses.dataclass(frozen=True)
class CallInputs:
    """What one pipeline call gets: the run's image indices (padding included), their generators and latents."""

    indices: list[int]
    generators: list[Any]
    latents: Any
    step_end: Callable


def _common_arguments(loaded: LoadedPipeline, request: GenerationRequest, call: CallInputs) -> dict[str, Any]:
    return {
        **encode_prompt(loaded, request, len(call.indices)),
        "num_inference_steps": request.num_inference_steps,
        "guidance_scale": request.effective_guidance_scale,
        "generator": call.generators,
        "callback_on_step_end": call.step_end,
    }


def _text_to_image_call(loaded: LoadedPipeline, request: GenerationRequest, call: CallInputs) -> list[Any]:
    return _run(
        loaded,
        height=request.height,
        width=request.width,
        latents=call.latents,
        **_common_arguments(loaded, request, call),
    )


def _refine_call(loaded: LoadedPipeline, request: GenerationRequest, call: CallInputs) -> list[Any]:
    refine = request.refine
    images = [refine.images[index % len(refine.images)].image for index in call.indices]
    return _run(
        loaded,
        image=images,
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
        **_common_arguments(base, request, call),
    )
    return _run(
        refiner, image=latents, denoising_start=request.high_noise_frac, **_common_arguments(refiner, request, call)
    )


def _run(loaded: LoadedPipeline, **arguments) -> Any:
    """One pipeline call; its images as PIL images, or its latents when ``output_type="latent"`` is asked for."""
    decode = "output_type" not in arguments
    if decode:
        arguments["output_type"] = "pt"  # the decoded image, still where the VAE left it: see to_pil_images
    images = loaded.pipeline(**arguments).images
    return to_pil_images(images) if decode else images


def to_pil_images(images) -> list:
    """The pipeline's ``output_type="pt"`` images (N, 3, H, W in [0, 1], on any device) as 8-bit PIL images.

    The same arithmetic as diffusers' own ``output_type="pil"`` (float32 x 255, round half to even, to uint8), so the
    same pixels (test); written here because diffusers does it in numpy after copying the float image to the host,
    and then hands PIL a channel-strided array that it copies once more. Here the rounding runs where the image is
    (on the GPU with the CUDA provider) and only contiguous 8-bit pixels cross to the host: 5.7 instead of 37.5 ms
    per 1024² image on the H100 machine (bench/NOTES.md, run 7).
    """
    import torch
    from PIL import Image

    pixels = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return [Image.fromarray(image) for image in pixels]


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
) -> list[GeneratedImage]:
    """Make ``request.num_images`` images in ``request.num_calls`` pipeline calls and save them as PNG.

    With a ``safety_checker``, flagged images are never written: each is regenerated with a fresh seed, at most
    ``max_safety_retries`` times, after which :class:`SafetyCheckError` says how many could not be produced (the safe
    ones are saved).

    The mode follows the request: text-to-image, refinement of base images (``request.refine``), or base ->
    ``refiner`` hand-off (``request.high_noise_frac``). ``latents`` (torch, ``(num_images, C, H/f, W/f)``) replaces
    the seeded initial noise of first attempts, for tests and hand-offs. With static shapes every call runs at the
    pinned batch size: a short last batch is padded with extra seeds whose images are dropped. ``should_stop`` is
    polled after every step; a stopped run saves nothing more.
    """
    import torch

    if request.refine is not None:

        def call_pipeline(call):
            return _refine_call(loaded, request, call)
    elif refiner is not None:

        def call_pipeline(call):
            return _ensemble_call(loaded, refiner, request, call)
    else:

        def call_pipeline(call):
            return _text_to_image_call(loaded, request, call)

    output_dir.mkdir(parents=True, exist_ok=True)
    # slots still to fill: (image index, seed). A flagged image goes back in with a fresh seed, past the run's range.
    pending = [(index, request.image_seed(index)) for index in range(request.num_images)]
    fresh_seeds = itertools.count(request.image_seed(request.num_images))
    retries: collections.Counter[int] = collections.Counter()
    given_up: list[int] = []
    saved: list[GeneratedImage] = []
    step_counter = itertools.count(1)  # every step of every pipeline of the run (base, then refiner of a hand-off)
    calls_done = 0
    while pending:
        batch, pending = pending[: request.batch_size], pending[request.batch_size :]
        count = len(batch)
        slots = list(batch)
        while loaded.shape is not None and len(slots) < request.batch_size:
            slots.append((slots[-1][0], next(fresh_seeds)))  # padding for the pinned batch size: dropped
        first_attempts = all(request.image_seed(index) == seed for index, seed in batch)
        call_latents = None
        if latents is not None and first_attempts:
            call_latents = torch.stack([latents[index] for index, _ in slots])
        total_steps = (calls_done + 1 + math.ceil(len(pending) / request.batch_size)) * request.steps_per_call

        def step_end(pipe, step, timestep, callback_kwargs, _total=total_steps):
            if on_step is not None:
                on_step(min(next(step_counter), _total), _total)
            if should_stop is not None and should_stop():
                pipe._interrupt = True  # diffusers' own way to leave the denoising loop early
            return callback_kwargs

        call = CallInputs(
            indices=[index for index, _ in slots],
            generators=[torch.Generator().manual_seed(seed) for _, seed in slots],
            latents=call_latents,
            step_end=step_end,
        )
        making = (
            f"making {request.width}x{request.height} images in batches of {request.batch_size} "
            f"(images saved so far: {len(saved)} of {request.num_images})"
        )
        fix = "lower --width/--height or --batch_size"
        if loaded.provider.olive_device == "gpu" and not loaded.low_vram:
            fix += ", or add --low_vram"
        elif not loaded.vae_tiling:
            fix += ", or add --vae_tiling"
        with memory_errors(loaded.provider, making, fix):
            images = call_pipeline(call)[:count]
        calls_done += 1
        if should_stop is not None and should_stop():
            logger.info("stopped: the images of call %d are not saved", calls_done)
            break
        with memory_errors(loaded.provider, making, "lower --batch_size"):
            flags = safety_checker(images) if safety_checker is not None else [False] * count
        for (index, seed), image, flagged in zip(batch, images, flags, strict=True):
            if flagged:
                retries[index] += 1
                if retries[index] > max_safety_retries:
                    given_up.append(index)
                    logger.warning(
                        "image %d was flagged by the safety checker %d times: giving it up", index, retries[index]
                    )
                else:
                    pending.append((index, next(fresh_seeds)))
                    logger.info("image %d (seed %d) was flagged by the safety checker: regenerating", index, seed)
                continue
            metadata = png_metadata(loaded, request, seed=seed, index=index, refiner=refiner)
            generated = GeneratedImage(
                path=save_png(image, output_dir, seed=seed, metadata=metadata), seed=seed, index=index
            )
            saved.append(generated)
            logger.info("saved %s", generated.path)
            if on_image is not None:
                on_image(generated)
    if given_up:
        raise SafetyCheckError(
            f"{len(given_up)} of {request.num_images} image(s) were flagged by the safety checker "
            f"{max_safety_retries + 1} times and were not written ({len(saved)} saved); raise --max_safety_retries "
            "or change the prompt"
        )
    return saved


def png_metadata(
    loaded: LoadedPipeline, request: GenerationRequest, *, seed: int, index: int, refiner: LoadedPipeline | None = None
) -> dict[str, str]:
    """Generation parameters stored as PNG text chunks (readable with ``PIL.Image.open(p).text``)."""
    metadata = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt or "",
        "seed": str(seed),
        "num_inference_steps": str(request.num_inference_steps),
        "guidance_scale": str(request.effective_guidance_scale),
        "width": str(request.width),
        "height": str(request.height),
        "model": loaded.model_label,
        "provider": loaded.provider.name,
        "software": "sdxl-olive",
    }
    if loaded.vae_tiling:
        metadata["vae_tiling"] = "on"
    if request.refine is not None:
        refine = request.refine
        metadata.update(
            base_image=refine.images[index % len(refine.images)].path.name,
            strength=str(refine.strength),
            aesthetic_score=str(refine.aesthetic_score),
            negative_aesthetic_score=str(refine.negative_aesthetic_score),
        )
    if refiner is not None:
        metadata.update(refiner_model=refiner.model_label, high_noise_frac=str(request.high_noise_frac))
    return metadata


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
