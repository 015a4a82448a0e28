"""Images out of the pipeline: 8-bit PIL images, their PNG metadata, and PNG files written atomically."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from sd_utils.files import follow_umask, remove_stale
from sd_utils.generation.request import GenerationRequest
from sd_utils.runtime.pipeline import LoadedPipeline


def to_pil_images(images) -> list:
    """The pipeline's ``output_type="pt"`` images (N, 3, H, W in [0, 1], on any device) as 8-bit PIL images.

    The same arithmetic as diffusers' own ``output_type="pil"`` (float32 x 255, round half to even, to uint8), so the
    same pixels (test); written here because diffusers does it in numpy after copying the float image to the host,
    and then hands PIL a channel-strided array that it copies once more. Here the rounding runs where the image is
    (on the GPU with the CUDA provider) and only contiguous 8-bit pixels cross to the host (bench/NOTES.md, run 7).
    """
    import torch
    from PIL import Image

    pixels = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return [Image.fromarray(image) for image in pixels]


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


_NAME = re.compile(r"^(\d{5,})-")  # NNNNN-<seed>.png, past 99999 too
_PARTIAL = re.compile(r"^\.partial-(\d+)-")  # .partial-<pid>-<random>.png


def save_png(image, output_dir: Path, *, seed: int, metadata: dict[str, str]) -> Path:
    """Save ``image`` as ``NNNNN-<seed>.png``, NNNNN one above the highest number already in ``output_dir``.

    The file is written under a temporary name (with the mode the umask gives, like any program's output) and
    hard-linked into place, which fails rather than overwrite: no existing image is ever replaced and no half-written
    PNG appears under a final name. Temporary files of killed runs are deleted.
    """
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)
    remove_stale(output_dir, _PARTIAL)
    handle, temporary = tempfile.mkstemp(prefix=f".partial-{os.getpid()}-", suffix=".png", dir=output_dir)
    os.close(handle)
    try:
        follow_umask(Path(temporary))
        image.save(temporary, pnginfo=info)
        return _link_free_name(Path(temporary), output_dir, seed=seed)
    finally:
        os.unlink(temporary)


def _link_free_name(temporary: Path, output_dir: Path, *, seed: int) -> Path:
    """Hard-link ``temporary`` as the next free ``NNNNN-<seed>.png`` (a name another run took meanwhile is skipped)."""
    number = 1 + max((int(m.group(1)) for p in output_dir.iterdir() if (m := _NAME.match(p.name))), default=-1)
    while True:
        path = output_dir / f"{number:05d}-{seed}.png"
        try:
            os.link(temporary, path)
            return path
        except FileExistsError:
            number += 1
