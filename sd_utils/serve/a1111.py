"""AUTOMATIC1111's ``/sdapi/v1`` request and response JSON, translated to and from the tool's options.

A request becomes the :class:`~sd_utils.options.Options` the same run would have on the command line (so the CLI's
checks, prompt syntax, LoRA tags and seeds apply unchanged), its images go into files of the server's own scratch
folder. A1111's clients send every field at A1111's defaults (``webuiapi`` sends ~40): a field at its default is
accepted; a value the tool would have to ignore (hires fix, face restoration, tiling, subseeds, scripts) is a
:class:`~sd_utils.errors.UserInputError` naming the field, which the server answers with 422.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import math
import re
import time
from pathlib import Path
from typing import Any

from sd_utils.errors import UserInputError
from sd_utils.generation.png_parameters import scheduler_of, split_parameters
from sd_utils.generation.schedulers import SAMPLERS
from sd_utils.options import MAX_SEED, Options, check_options
from sd_utils.serve.controlnet_units import control_changes

# limits of one request (docs/serve.md): pixels of a generated or uploaded image, images per request
MAX_SIDE = 4096
MAX_IMAGES = 64
MAX_UPLOAD_PIXELS = 4096 * 4096

# A1111's schedule types (its /schedulers); the tool has its samplers' own ("automatic") and Karras
SCHEDULES = {"automatic": "Automatic", "karras": "Karras"}

# field -> the values at which the tool does what A1111 does (a client sends them at A1111's defaults)
_NEUTRAL: dict[str, tuple] = {
    "enable_hr": (False, None),
    "firstphase_width": (0, None),
    "firstphase_height": (0, None),
    "styles": (None, []),
    "subseed_strength": (0, 0.0, None),
    "seed_resize_from_h": (-1, 0, None),
    "seed_resize_from_w": (-1, 0, None),
    "restore_faces": (False, None),
    "tiling": (False, None),
    "eta": (None, 1.0),
    "s_min_uncond": (None, 0, 0.0),
    "s_churn": (None, 0, 0.0),
    "s_tmax": (None, 0, 0.0),
    "s_tmin": (None, 0, 0.0),
    "s_noise": (None, 1, 1.0),
    "script_name": (None, ""),
    "script_args": (None, []),
    "refiner_checkpoint": (None, "", "None"),
    "refiner_switch_at": (None, 0, 0.0, 0.8),
    "disable_extra_networks": (False, None),
    "firstpass_image": (None, ""),
    "resize_mode": (0, None),
    "initial_noise_multiplier": (None, 1, 1.0),
    "latent_mask": (None, ""),
    "inpainting_fill": (0, 1, None),
    "image_cfg_scale": None,  # instruct-pix2pix models only: any value (A1111 ignores it for other models)
}
# fields whose value never changes what the tool makes (saving, bookkeeping, settings of features that are off)
_FREE = {
    "prompt", "negative_prompt", "seed", "subseed", "sampler_name", "sampler_index", "scheduler", "batch_size",
    "n_iter", "steps", "cfg_scale", "width", "height", "do_not_save_samples", "do_not_save_grid", "denoising_strength",
    "override_settings", "override_settings_restore_afterwards", "send_images", "save_images", "alwayson_scripts",
    "force_task_id", "infotext", "comments", "user", "init_images", "mask", "mask_blur", "mask_blur_x",
    "mask_blur_y", "mask_round", "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert",
    "include_init_images", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y",
    "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt", "hr_cfg",
    "hr_distilled_cfg", "distilled_cfg_scale",
}  # fmt: skip
# what a non-neutral value of a field would need
_WHAT = {
    "enable_hr": "hires fix",
    "restore_faces": "face restoration",
    "tiling": "tiling",
    "subseed_strength": "variation seeds",
    "styles": "styles",
    "script_name": "scripts",
    "script_args": "scripts",
    "refiner_checkpoint": "a refiner per request (start the server with --refiner_model_id)",
    "resize_mode": "resize modes other than 0 (just resize)",
    "inpainting_fill": "masked content 'latent noise'/'latent nothing'",
}


@dataclasses.dataclass(frozen=True)
class ApiRequest:
    """One txt2img or img2img request, read: the run's options and what the response needs besides the images."""

    options: Options
    payload: dict[str, Any]  # as sent (A1111 echoes it as ``parameters``, without the images)
    send_images: bool = True
    save_images: bool = False
    include_init_images: bool = False
    init_images: tuple = ()  # PIL images, for include_init_images


def check_fields(payload: dict[str, Any]) -> None:
    """One :class:`UserInputError` naming the first field the tool cannot honour."""
    for field, value in payload.items():
        if field in _FREE or (field in _NEUTRAL and _NEUTRAL[field] is None):
            continue
        if field in _NEUTRAL:
            if value not in _NEUTRAL[field]:
                what = _WHAT.get(field, f"{field} other than {_NEUTRAL[field][0]!r}")
                raise UserInputError(
                    f"{field}={json.dumps(value)}: sdxl-olive does not do {what}; leave {field} at "
                    f"{json.dumps(_NEUTRAL[field][0])}"
                )
        elif value not in (None, False, 0, "", [], {}):
            raise UserInputError(f"{field}={json.dumps(value)}: not an A1111 field this server knows; leave it out")
    for field in ("override_settings", "alwayson_scripts"):
        value = payload.get(field) or {}
        if not isinstance(value, dict):
            raise UserInputError(f"{field} must be an object, got {json.dumps(value)}")


def scheduler_for(payload: dict[str, Any]) -> str | None:
    """The ``--scheduler`` of A1111's ``sampler_name`` (or the older ``sampler_index``) and ``scheduler``; None
    when the request names no sampler (the model's own runs)."""
    sampler = payload.get("sampler_name") or payload.get("sampler_index")
    schedule = payload.get("scheduler") or "automatic"
    schedule_key = str(schedule).lower()
    if schedule_key not in SCHEDULES:
        raise UserInputError(
            f"scheduler={json.dumps(schedule)}: the schedule types here are {', '.join(SCHEDULES)}; use one of them"
        )
    if not sampler:
        return None
    karras = "Karras" if schedule_key == "karras" else None
    name = scheduler_of(str(sampler), karras)
    if name is None and karras is None:  # "DPM++ 2M Karras" (A1111's older names) reads as sampler + Karras
        name = scheduler_of(str(sampler), None)
    if name is None:
        known = ", ".join(sorted({row.a1111_sampler for row in SAMPLERS.values()}))
        combo = f" with schedule type {SCHEDULES[schedule_key]}" if karras else ""
        raise UserInputError(f"sampler_name={json.dumps(sampler)}{combo} is not a sampler here ({known}); pick one")
    return name


def decode_image(text: Any, field: str):
    """A base64 PNG/JPEG (A1111 takes a ``data:image/...;base64,`` prefix too) as an 8-bit PIL image."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(text, str) or not text:
        raise UserInputError(f"{field}: expected a base64-encoded PNG or JPEG, got {type(text).__name__}")
    data = text.split(",", 1)[1] if text.startswith("data:") else text
    try:
        raw = base64.b64decode(data, validate=False)
        image = Image.open(io.BytesIO(raw))
        if image.width * image.height > MAX_UPLOAD_PIXELS:
            raise UserInputError(
                f"{field}: {image.width}x{image.height} pixels is over this server's limit of "
                f"{MAX_UPLOAD_PIXELS:,}; send a smaller image"
            )
        image.load()
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as error:
        raise UserInputError(f"{field}: not a base64-encoded PNG or JPEG ({error}); send one") from None
    return image


def encode_png(image, text: dict[str, str] | None = None) -> str:
    """``image`` as base64 PNG, with ``text`` as its PNG text chunks (the metadata files get)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _number(payload: dict, field: str, kind, default, *, low=None, high=None):
    value = payload.get(field, default)
    if value is None:
        value = default
    try:
        number = kind(value)
        if isinstance(value, bool) or (kind is int and number != value) or not math.isfinite(number):
            raise ValueError
    except (TypeError, ValueError):
        expected = "an integer" if kind is int else "a number"
        raise UserInputError(f"{field}={json.dumps(value)}: expected {expected}") from None
    if (low is not None and number < low) or (high is not None and number > high):
        raise UserInputError(f"{field}={json.dumps(value)}: expected a value from {low} to {high}")
    return number


def read_request(
    payload: dict[str, Any], base: Options, *, mode: str, scratch: Path, controlnets: dict[str, str] | None = None
) -> ApiRequest:
    """The options of a ``txt2img`` or ``img2img`` request (``mode``) over the server's ``base`` options; uploaded
    images are written into ``scratch`` (the server's own folder for this request); ``controlnets``: the server's
    ControlNets (name -> ``--controlnet`` value) that ``alwayson_scripts.controlnet`` units may name."""
    check_fields(payload)
    batch = _number(payload, "batch_size", int, 1, low=1, high=MAX_IMAGES)
    n_iter = _number(payload, "n_iter", int, 1, low=1, high=MAX_IMAGES)
    if batch * n_iter > MAX_IMAGES:
        raise UserInputError(f"batch_size x n_iter = {batch * n_iter} images; this server makes at most {MAX_IMAGES}")
    seed = _number(payload, "seed", int, -1, low=-1, high=MAX_SEED)
    changes: dict[str, Any] = {
        "prompt": str(payload.get("prompt") or ""),
        "negative_prompt": str(payload.get("negative_prompt") or "") or None,
        "num_images": batch * n_iter,
        "batch_size": batch,
        "num_inference_steps": _number(payload, "steps", int, 50, low=1, high=1000),
        "guidance_scale": _number(payload, "cfg_scale", float, 7.0, low=0, high=100),
        "seed": None if seed == -1 else seed,
        "width": _number(payload, "width", int, 512, low=8, high=MAX_SIDE),
        "height": _number(payload, "height", int, 512, low=8, high=MAX_SIDE),
        "image_size": None,
        "scheduler": scheduler_for(payload) or base.scheduler,
        # one run of the CLI, as the server's own options would make it
        "interactive": False,
        "prompts_file": None,
        "from_png": None,
        "serve": False,
        "ray": None,
        "workers": None,
        "api_auth": None,
        "serve_model": (),
    }
    if not changes["prompt"].strip():
        changes["prompt"] = " "  # A1111 draws from an empty prompt: the tokenizer gives the empty text's tokens
    size = (changes["width"], changes["height"])
    scripts = payload.get("alwayson_scripts") or {}
    changes.update(control_changes(scripts, controlnets or {}, scratch, decode_image, size=size))
    init_images: tuple = ()
    if mode == "img2img":
        init_images = _init_images(payload)
        changes.update(_image_to_image(payload, init_images, scratch, batch * n_iter))
    options = dataclasses.replace(base, **changes)
    check_options(options)
    return ApiRequest(
        options=options,
        payload={key: value for key, value in payload.items() if key not in ("init_images", "mask")},
        send_images=payload.get("send_images", True) is not False,
        save_images=bool(payload.get("save_images")),
        include_init_images=bool(payload.get("include_init_images")),
        init_images=init_images,
    )


def _init_images(payload: dict[str, Any]) -> tuple:
    images = payload.get("init_images") or []
    if not isinstance(images, list) or not images:
        raise UserInputError('init_images: img2img needs at least one base64 image; send init_images: ["..."]')
    return tuple(decode_image(text, f"init_images[{index}]") for index, text in enumerate(images))


def _image_to_image(payload: dict[str, Any], images: tuple, scratch: Path, count: int) -> dict[str, Any]:
    """img2img's options: its images (and mask, blurred by ``mask_blur`` as A1111 does, inverted with
    ``inpainting_mask_invert``) as files of ``scratch``, and the denoising strength."""
    from PIL import ImageFilter, ImageOps

    paths = []
    for index, image in enumerate(images):
        paths.append(scratch / f"init_images-{index}.png")
        image.save(paths[-1])
    masks = ()
    if payload.get("mask"):
        mask = decode_image(payload["mask"], "mask").convert("L")
        if _number(payload, "inpainting_mask_invert", int, 0, low=0, high=1):
            mask = ImageOps.invert(mask)
        blur = _number(payload, "mask_blur", float, 4, low=0, high=64)
        if blur:
            mask = mask.filter(ImageFilter.GaussianBlur(blur))
        masks = (scratch / "mask.png",)
        mask.save(masks[0])
    strength = _number(payload, "denoising_strength", float, 0.75, low=0, high=1)
    if strength == 0:
        raise UserInputError("denoising_strength=0 changes nothing; use e.g. 0.75 (or 0.3 for a light touch)")
    return {
        "base_images": tuple(paths),
        "mask_image": masks,
        "strength": strength,
        "num_images": max(count, len(paths)),
    }


def samplers() -> list[dict[str, Any]]:
    """``/sdapi/v1/samplers``: A1111's sampler names the tool has, each with its ``--scheduler`` names."""
    rows: dict[str, dict[str, Any]] = {}
    for name, row in SAMPLERS.items():
        entry = rows.setdefault(row.a1111_sampler, {"name": row.a1111_sampler, "aliases": [], "options": {}})
        entry["aliases"].append(name)
        if row.config.get("use_karras_sigmas"):
            entry["options"]["scheduler"] = "karras"  # A1111's note of a schedule type the sampler also runs with
    return list(rows.values())


def schedulers() -> list[dict[str, Any]]:
    return [
        {"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
        for name, label in SCHEDULES.items()
    ]


def _sampler(infotext: str) -> str:
    found = re.search(r"(?:^|, )Sampler: ([^,\n]+)", infotext.rsplit("\n", 1)[-1])
    return found.group(1) if found else ""


def info_json(
    options: Options, metadata: list[dict[str, str]], seeds: list[int], *, model: str, model_hash: str | None
) -> str:
    """A1111's ``info`` (a JSON string): the run's settings and each image's infotext (PNG ``parameters``)."""
    first = seeds[0] if seeds else (options.seed or 0)
    texts = [item.get("parameters", "") for item in metadata]
    info = {
        "prompt": options.prompt,
        "all_prompts": [options.prompt] * len(seeds),
        "negative_prompt": options.negative_prompt or "",
        "all_negative_prompts": [options.negative_prompt or ""] * len(seeds),
        "seed": first,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0,
        "width": options.width,
        "height": options.height,
        "sampler_name": _sampler(texts[0]) if texts else "",
        "cfg_scale": options.guidance_scale,
        "steps": options.num_inference_steps,
        "batch_size": options.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": model,
        "sd_model_hash": model_hash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": options.strength,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": texts,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "version": "sdxl-olive",
    }
    return json.dumps(info)


def png_info(text: Any) -> dict[str, Any]:
    """``/png-info``: the image's A1111 parameters text (``info``), its other text chunks (``items``) and the
    parameters as A1111 parses them (``Prompt``, ``Negative prompt``, ``Steps``, ..., ``Size-1``/``Size-2``)."""
    image = decode_image(text, "image")
    items = {key: value for key, value in image.info.items() if isinstance(value, str)}
    info = items.pop("parameters", "")
    parameters: dict[str, Any] = {}
    if info:
        prompt, negative, settings = split_parameters(info)
        parameters = {"Prompt": prompt, "Negative prompt": negative or "", **settings}
        width, _, height = settings.get("Size", "").partition("x")
        if width.isdigit() and height.isdigit():
            parameters.update({"Size-1": width, "Size-2": height})
    return {"info": info, "items": items, "parameters": parameters}
