"""Every place where the tool changes optimum's ORT pipeline objects instead of only calling them.

optimum-onnx's ``ORTStableDiffusionXL(Img2Img)Pipeline`` has no public way to drop a component's session, swap a
component's ``forward`` or stop a run after a step, and the tool needs all three (``--low_vram``, the CUDA-graph
UNet, ``--vae_tiling``, the window's Stop). They are done here, and only here, against the attributes of
optimum-onnx 0.1.0 (``modeling_diffusion.py``: ``parts``, ``vae.encoder``, ``ORTTextEncoder``, the parts' ``forward``)
and diffusers 0.39's ``_interrupt`` flag; a newer optimum-onnx must be checked against this module.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


def pipeline_class(task: str):
    """optimum's SDXL pipeline for ``task``: ``text2img``, ``img2img`` (refiners too) or ``inpaint``."""
    import optimum.onnxruntime as ort_pipelines

    names = {
        "text2img": "ORTStableDiffusionXLPipeline",
        "img2img": "ORTStableDiffusionXLImg2ImgPipeline",
        "inpaint": "ORTStableDiffusionXLInpaintPipeline",
    }
    return getattr(ort_pipelines, names[task])


def drop_parts(pipeline, names) -> None:
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


def add_text_encoder(pipeline, name: str, session, *, io_binding: bool) -> None:
    """Give ``pipeline`` a text-encoder part ``name`` over ``session`` (one that :func:`drop_parts` removed)."""
    from optimum.onnxruntime.modeling_diffusion import ORTTextEncoder

    part = ORTTextEncoder(session, pipeline, io_binding)
    setattr(pipeline, name, part)
    pipeline.parts.append(part)


def interrupt(pipeline) -> None:
    """Make diffusers' denoising loop end after the current step (its own flag, set by its ``interrupt`` property's
    setter-less attribute)."""
    pipeline._interrupt = True


def _as_output(forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` (returning one tensor) as optimum's parts return: a ``ModelOutput`` with ``sample``, or a tuple."""

    def wrapped(*args, return_dict=True, **kwargs):
        out = forward(*args, **kwargs)
        if not return_dict:
            return (out,)
        from transformers.utils import ModelOutput

        return ModelOutput(sample=out)

    return wrapped


def set_unet_forward(
    pipeline, run: Callable[[dict[str, Any]], Any], residuals: Callable[[Any, Any], dict[str, Any]] | None = None
) -> None:
    """Make the pipeline's UNet call ``run(feeds)`` (feeds by ONNX input name) instead of its session;
    ``residuals(down, mid)`` names a ControlNet's residuals for a UNet that takes them."""

    def forward(
        sample,
        timestep,
        encoder_hidden_states,
        timestep_cond=None,
        cross_attention_kwargs=None,
        added_cond_kwargs=None,
        down_block_additional_residuals=None,
        mid_block_additional_residual=None,
    ):
        feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states}
        feeds.update(added_cond_kwargs or {})
        if residuals is not None:
            feeds.update(residuals(down_block_additional_residuals, mid_block_additional_residual))
        return run(feeds)

    pipeline.unet.forward = _as_output(forward)


def set_vae_decoder_forward(pipeline, decode: Callable[[Callable[[Any], Any], Any], Any]) -> None:
    """Make the pipeline's VAE decoder call ``decode(plain_decode, latent_sample)``, where ``plain_decode`` runs the
    decoder's own session on some latents and returns the image tensor."""
    decoder = pipeline.vae_decoder
    plain = decoder.forward

    def forward(latent_sample, generator=None):
        return decode(lambda latents: plain(latents, return_dict=False)[0], latent_sample)

    decoder.forward = _as_output(forward)


def controlnet_pipeline(pipeline, controlnets: list, task: str):
    """diffusers' SDXL ControlNet pipeline for ``task`` over the parts of optimum's ``pipeline`` (its text encoders,
    VAE, UNet session and scheduler) and ``controlnets`` (``ControlNetModel``-like modules, always as a
    ``MultiControlNetModel``: one code path for one and several). The add-time-ids step is optimum's (diffusers'
    reads the UNet's PyTorch layers)."""
    import diffusers
    import optimum.onnxruntime as ort_pipelines
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    names = {
        "text2img": ("StableDiffusionXLControlNetPipeline", "ORTStableDiffusionXLPipeline"),
        "img2img": ("StableDiffusionXLControlNetImg2ImgPipeline", "ORTStableDiffusionXLImg2ImgPipeline"),
        "inpaint": ("StableDiffusionXLControlNetInpaintPipeline", "ORTStableDiffusionXLInpaintPipeline"),
    }
    diffusers_name, optimum_name = names[task]
    base = getattr(diffusers, diffusers_name)
    time_ids = getattr(ort_pipelines, optimum_name)._get_add_time_ids
    if task == "inpaint":  # diffusers' ControlNet inpainting passes no negative sizes: they are the positive ones
        time_ids = _inpaint_time_ids
    cls = type(f"ORT{diffusers_name}", (base,), {"_get_add_time_ids": time_ids})
    parts = {
        "vae": pipeline.vae,
        "text_encoder": pipeline.text_encoder,
        "text_encoder_2": pipeline.text_encoder_2,
        "tokenizer": pipeline.tokenizer,
        "tokenizer_2": pipeline.tokenizer_2,
        "unet": pipeline.unet,
        "controlnet": MultiControlNetModel(controlnets),
        "scheduler": pipeline.scheduler,
        "force_zeros_for_empty_prompt": pipeline.config.get("force_zeros_for_empty_prompt", True),
        "requires_aesthetics_score": pipeline.config.get("requires_aesthetics_score", False),
        "add_watermarker": False,
    }
    accepted = set(inspect.signature(base.__init__).parameters)
    controlled = cls(**{name: value for name, value in parts.items() if name in accepted})
    controlled.parts = pipeline.parts  # what drop_parts and the provider checks walk
    return controlled


def _inpaint_time_ids(
    self, original_size, crops_coords_top_left, target_size, aesthetic_score, negative_aesthetic_score, dtype,
    text_encoder_projection_dim=None,
):  # fmt: skip
    """diffusers' ControlNet inpainting's add-time-ids signature over optimum's image-to-image computation."""
    from optimum.onnxruntime import ORTStableDiffusionXLImg2ImgPipeline

    sizes = (original_size, crops_coords_top_left, target_size)
    return ORTStableDiffusionXLImg2ImgPipeline._get_add_time_ids(
        self, *sizes, aesthetic_score, negative_aesthetic_score, *sizes, dtype, text_encoder_projection_dim
    )
