"""Images out of the pipeline: 8-bit PIL images, their PNG metadata, and PNG files written atomically."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sd_utils.files import follow_umask, remove_stale
from sd_utils.generation.lora_tags import prompt_loras
from sd_utils.generation.request import GenerationRequest
from sd_utils.generation.schedulers import a1111_names, scheduler_name
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
        **made_from(loaded.build_record, request),
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
        if refine.masks:
            metadata["mask_image"] = refine.masks[index % len(refine.masks)].path.name
    if refiner is not None:
        metadata.update(refiner_model=refiner.model_label, high_noise_frac=str(request.high_noise_frac))
    metadata["scheduler"] = scheduler_name(loaded.scheduler_config, request.scheduler)
    if request.timestep_spacing is not None:
        metadata["timestep_spacing"] = request.timestep_spacing
    if request.uses_cfg and request.cfg_cutoff < 1:
        metadata["cfg_cutoff"] = f"{request.cfg_cutoff:g}"
    if request.cache_interval > 1:
        metadata["cache_interval"] = str(request.cache_interval)
    if request.control is not None:
        control = request.control
        metadata["controlnets"] = ", ".join(f"{net.name}:{net.scale:g}:{net.short_hash}" for net in control.nets)
        metadata["control_images"] = ", ".join(f"{item.path.name} ({item.preprocess})" for item in control.images)
    metadata["parameters"] = a1111_parameters(loaded, request, seed=seed)
    return metadata


def _a1111_controlnets(request: GenerationRequest) -> dict[str, str]:
    """A1111's ControlNet extension fields (``ControlNet 0: "Module: canny, Model: name [hash], Weight: 0.8, …"``)."""
    control = request.control
    if control is None:
        return {}
    fields = {}
    for index, (net, image) in enumerate(zip(control.nets, control.images, strict=True)):
        parts = {
            "Module": image.preprocess,
            "Model": f"{net.name} [{net.short_hash}]",
            "Weight": f"{net.scale:g}",
            "Resize Mode": "Just Resize",
            **(
                {"Threshold A": control.canny[0], "Threshold B": control.canny[1]}
                if image.preprocess == "canny"
                else {}
            ),
            "Guidance Start": f"{control.start:g}",
            "Guidance End": f"{control.end:g}",
            "Control Mode": "Balanced",
        }
        fields[f"ControlNet {index}"] = ", ".join(f"{key}: {value}" for key, value in parts.items())
    return fields


def _lora_hash(lora: dict) -> str:
    """A1111's and Civitai's short LoRA hash: 12 hex digits of the tensor data's SHA-256 (older build records hold
    only the whole file's hash, shown in its place)."""
    return (lora.get("tensors_sha256") or lora["sha256"])[:12]


def all_loras(record: dict, request: GenerationRequest | None = None) -> list[dict]:
    """The LoRAs of an image, as build records hold them: those fused into the build, then the run's own."""
    return [*(record.get("loras") or []), *(lora.identity() for lora in (request.loras if request else ()))]


def made_from(record: dict, request: GenerationRequest | None = None) -> dict[str, str]:
    """What a build's record says it was made from, as PNG text keys: the checkpoint file and its short hash, a
    ``--unet`` file, the LoRAs (``name:scale:hash``, comma-separated; fused and the run's) and the VAE (the model's
    own, or the fp16-fixed one)."""
    facts = {}
    source = record.get("source") or {}
    if source.get("kind") == "file":
        facts["checkpoint"] = Path(source["source"]).name
        facts["checkpoint_hash"] = source["weights"][:10]
    if record.get("unet"):
        facts["unet"] = f"{record['unet']['name']}:{record['unet']['sha256'][:10]}"
    loras = all_loras(record, request)
    if loras:
        facts["loras"] = ", ".join(f"{lora['name']}:{lora['scale']:g}:{lora['sha256'][:10]}" for lora in loras)
    facts["vae"] = _vae_name(record) or "the model's own"
    return facts


def _vae_name(record: dict) -> str | None:
    """The fp16-fixed VAE (its hub id, or its folder's name) from a record's ``id`` or ``folder:digest``; None for
    the model's own VAE."""
    vae = record.get("vae")
    if not vae:
        return None
    folder = re.sub(r":[0-9a-f]{16}$", "", vae)
    return folder if folder == vae else Path(folder).name


def _a1111_value(value: object) -> str:
    """A value as A1111 writes it in its parameters line: JSON-quoted when it holds a separator."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(char in text for char in ',:\n"') else text


def a1111_parameters(loaded: LoadedPipeline, request: GenerationRequest, *, seed: int) -> str:
    """The ``parameters`` text chunk in A1111's format (prompt, ``Negative prompt:`` line, then ``Key: value`` pairs),
    which A1111's PNG Info, Civitai and ComfyUI read. ``Model hash`` is a single-file checkpoint's short SHA-256, as
    A1111's; a diffusers folder has no single file to hash, so it is the build's digest (build.json) there."""
    sampler, schedule = a1111_names(loaded.scheduler_config, request.scheduler)
    record = loaded.build_record
    facts = made_from(record)
    loras = all_loras(record, request)
    fields = {
        "Steps": request.num_inference_steps,
        "Sampler": sampler,
        "Schedule type": schedule,
        "CFG scale": f"{request.effective_guidance_scale:g}",
        "CFG cutoff": f"{request.cfg_cutoff:g}" if request.uses_cfg and request.cfg_cutoff < 1 else None,
        "DeepCache interval": request.cache_interval if request.cache_interval > 1 else None,
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model hash": facts.get("checkpoint_hash", loaded.build_digest),
        "Model": Path(facts["checkpoint"]).stem if "checkpoint" in facts else loaded.model_label,
        "VAE": _vae_name(record),
        "Denoising strength": request.refine.strength if request.refine is not None else None,
        "Lora hashes": ", ".join(f"{lora['name']}: {_lora_hash(lora)}" for lora in loras) or None,
        **_a1111_controlnets(request),
        "Version": "sdxl-olive",
    }
    line = ", ".join(f"{key}: {_a1111_value(value)}" for key, value in fields.items() if value is not None)
    negative = f"\nNegative prompt: {request.negative_prompt}" if request.negative_prompt else ""
    # A1111 names the LoRAs of an image in its prompt, where its PNG Info and Civitai look for them (those the
    # prompt asked for are there already)
    tagged = {name for name, _weight in prompt_loras(request.prompt)}
    tags = "".join(f" <lora:{lora['name']}:{lora['scale']:g}>" for lora in loras if lora["name"] not in tagged)
    return f"{request.prompt}{tags}{negative}\n{line}"


_NAME = re.compile(r"^(\d{5,})-")  # NNNNN-<seed>.png, past 99999 too
_PARTIAL = re.compile(r"^\.partial-(\d+)-")  # .partial-<pid>-<random>.png


@contextlib.contextmanager
def _png_aside(image, folder: Path, metadata: dict[str, str]) -> Iterator[Path]:
    """``image`` written as a PNG under a temporary name in ``folder`` (with the mode the umask gives, like any
    program's output), deleted after the block; temporary files of killed runs are deleted first."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)
    remove_stale(folder, _PARTIAL)
    handle, temporary = tempfile.mkstemp(prefix=f".partial-{os.getpid()}-", suffix=".png", dir=folder)
    os.close(handle)
    try:
        follow_umask(Path(temporary))
        image.save(temporary, pnginfo=info)
        yield Path(temporary)
    finally:
        os.unlink(temporary)


def save_png(image, output_dir: Path, *, seed: int, metadata: dict[str, str]) -> Path:
    """Save ``image`` as ``NNNNN-<seed>.png``, NNNNN one above the highest number already in ``output_dir``.

    Written aside and hard-linked into place, which fails rather than overwrite: no existing image is ever replaced
    and no half-written PNG appears under a final name.
    """
    with _png_aside(image, output_dir, metadata) as temporary:
        return _link_free_name(temporary, output_dir, seed=seed)


def save_png_as(image, path: Path, *, metadata: dict[str, str]) -> Path:
    """Save ``image`` as exactly ``path``, atomically as :func:`save_png`; a file already there (a retried batch of a
    job made it) is kept, not written again."""
    with _png_aside(image, path.parent, metadata) as temporary, contextlib.suppress(FileExistsError):
        os.link(temporary, path)
    return path


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
