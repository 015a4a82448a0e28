"""Single-file SDXL checkpoints (the A1111 / ComfyUI / Civitai layout) turned into diffusers folders, offline.

Only ``.safetensors`` files are read, and only their header until the file is known to be an SDXL base or refiner:
pickled checkpoints (``.ckpt``, ``.pt``, ``.bin``) can run code when loaded and are refused without being opened.
The conversion is diffusers' own (``from_single_file`` and its CLIP converter), component by component, with the
configs of the model's architecture given locally (``--config``, or the SDXL 1.0 configs this project writes), so
no hub is needed and at most one component's weights are in memory at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sd_utils.errors import ModelNotFoundError
from sd_utils.files import exclusive, follow_umask, remove_stale, replace_folder

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
PICKLE_FIX = (
    "pickled checkpoints can run code when loaded, so they are never opened; convert it to .safetensors where you "
    "trust it (e.g. with the safetensors 'convert' space, or torch.load + safetensors.torch.save_file), or download "
    "the .safetensors version"
)
UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_L = "conditioner.embedders.0.transformer."
BIGG_BASE = "conditioner.embedders.1.model."
BIGG_REFINER = "conditioner.embedders.0.model."
RECORD = "sdxl_olive_single_file.json"
STAGING = re.compile(r"^\..*-[0-9a-f]{8}-(\d+)-\w+$")  # .<stem>-<key>-<pid>-<random>: a conversion in progress
# bumped when the conversion changes what it writes, so older converted folders are not reused
CONVERT_FORMAT = 1


def refuse_pickle(path: Path, option: str) -> None:
    """Raise for a pickled checkpoint (by its suffix: it is never opened)."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelNotFoundError(f"{option} {path} is a pickled checkpoint ({path.suffix}): {PICKLE_FIX}")


def read_header(path: Path, option: str) -> dict[str, dict]:
    """The tensor table of safetensors file ``path`` (name -> dtype, shape), read without loading any tensor."""
    refuse_pickle(path, option)
    try:
        with path.open("rb") as stream:
            size = int.from_bytes(stream.read(8), "little")
            if not 2 <= size <= 100_000_000:
                raise ValueError("no safetensors header")
            header = json.loads(stream.read(size))
    except (ValueError, UnicodeDecodeError):
        raise ModelNotFoundError(
            f"{option} {path} is not a safetensors file (its header does not parse); if it is a pickled checkpoint "
            f"renamed, {PICKLE_FIX}"
        ) from None
    tensors = {key: value for key, value in header.items() if key != "__metadata__"}
    check_complete(path, option, header_size=size, tensors=tensors)
    return tensors


def check_complete(path: Path, option: str, *, header_size: int, tensors: dict[str, dict]) -> None:
    """Raise a one-line :class:`ModelNotFoundError` when ``path`` is shorter than its header says (an interrupted
    download or copy): safetensors would fail later with no file named."""
    try:
        needed = 8 + header_size + max((int(entry["data_offsets"][1]) for entry in tensors.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise ModelNotFoundError(f"{option} {path} has a damaged safetensors header; download it again") from None
    have = path.stat().st_size
    if have < needed:
        raise ModelNotFoundError(
            f"{option} {path} is incomplete: {have:,} of its {needed:,} bytes (an interrupted download or copy?); "
            "download or copy it again"
        )


def check_folder_weights(folder: Path, option: str) -> None:
    """Every ``.safetensors`` file under a diffusers folder complete (see :func:`check_complete`); headers only."""
    for path in sorted(folder.rglob("*.safetensors")):
        read_header(path, f"{option} {folder}:")


def looks_like_lora(keys) -> bool:
    """Whether tensor names ``keys`` are those of a LoRA (any layout diffusers reads)."""
    markers = (
        "lora_unet_",
        "lora_te",
        ".lora_A.",
        ".lora_B.",
        ".lora_down.",
        ".lora_up.",
        ".lora.down.",
        "lora_linear",
    )
    return any(marker in key for key in keys for marker in markers)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What a single-file checkpoint holds, read from its header."""

    path: Path
    refiner: bool
    dtype: str  # the safetensors dtype most of its floating-point weights have (F16, BF16, F32)
    inpainting: bool = False  # a 9-channel inpainting UNet (latents + mask + masked image latents)


def classify(path: Path, header: dict[str, dict], option: str = "--model_id") -> Checkpoint:
    """The SDXL base or refiner in ``header``, or a one-line :class:`ModelNotFoundError` saying what the file is."""
    keys = header.keys()

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)

    def found(what: str, fix: str) -> ModelNotFoundError:
        return ModelNotFoundError(f"{option} {path} is {what}; {fix}")

    sdxl = "give an SDXL base or refiner checkpoint"
    if looks_like_lora(keys):
        raise found("a LoRA, not a model", "pass it with --lora FILE[:SCALE] beside an SDXL --model_id")
    if any("double_blocks." in key for key in keys):
        raise found("a Flux model, which this tool does not run", sdxl)
    if any("joint_blocks." in key for key in keys) or has("text_encoders."):
        raise found("a Stable Diffusion 3 model, which this tool does not run", sdxl)
    if has("cond_stage_model.transformer."):
        raise found("a Stable Diffusion 1.x model, which this tool does not run", sdxl)
    if has("cond_stage_model.model."):
        raise found("a Stable Diffusion 2.x model, which this tool does not run", sdxl)
    if has("down_blocks.") and "conv_in.weight" in header:
        raise found(
            "a UNet alone in diffusers' layout, not a whole model",
            "give it with --unet FILE beside the --model_id it belongs to",
        )
    refiner = has(BIGG_REFINER) and not has(BIGG_BASE)
    if f"{UNET}label_emb.0.0.weight" in header and not (has(BIGG_BASE) or refiner):
        raise found("an SDXL checkpoint without its text encoders (no conditioner.* tensors)", "give a complete one")
    if not (has(UNET) and (has(BIGG_BASE) or refiner)):
        sample = ", ".join(sorted(keys)[:3]) or "no tensors"
        raise found(f"not an SDXL checkpoint (its tensors start {sample})", sdxl)
    conv_in = header.get(f"{UNET}input_blocks.0.0.weight", {}).get("shape", [0, 4])
    in_channels = conv_in[1] if len(conv_in) > 1 else 4
    if in_channels not in (4, 9) or (refiner and in_channels != 4):
        raise found(f"an SDXL-like model whose UNet takes {in_channels} input channels", sdxl)
    if not has(VAE):
        raise found("an SDXL checkpoint without its VAE (no first_stage_model.* tensors)", "give a complete checkpoint")
    counts: dict[str, int] = {}
    for entry in header.values():
        if entry.get("dtype") in ("F16", "BF16", "F32"):
            counts[entry["dtype"]] = counts.get(entry["dtype"], 0) + 1
    dtype = max(counts, key=counts.get) if counts else "F32"
    return Checkpoint(path=path, refiner=refiner, dtype=dtype, inpainting=in_channels == 9)


def file_sha256(path: Path, *, tensors_only: bool = False) -> str:
    """The SHA-256 of the file, or with ``tensors_only`` of its tensor data after the safetensors header: the hash
    A1111 and Civitai give a LoRA (kohya's "addnet" hash; metadata edits do not change it)."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        if tensors_only:
            stream.seek(8 + int.from_bytes(stream.read(8), "little"))
        while chunk := stream.read(16 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def file_identity(path: Path) -> str:
    """Which file and which version of it (path, size, modification time): hashing GBs on every run costs too much."""
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def read_record(folder: Path) -> dict:
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def converted_folder(checkpoint: Checkpoint, *, config_root: Path, config_digest: str, models_dir: Path) -> Path:
    """The diffusers folder of ``checkpoint`` under ``models_dir/converted``, converted first if missing or made from
    another version of the file (or other configs)."""
    identity = f"{file_identity(checkpoint.path)}|{config_digest}|{CONVERT_FORMAT}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:8]
    folder = models_dir / "converted" / f"{checkpoint.path.stem}-{key}"
    if read_record(folder).get("identity") == identity:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(folder.with_name(f".{folder.name}.lock"), waiting_for=f"converting {checkpoint.path}"):
        if read_record(folder).get("identity") == identity:
            return folder
        remove_stale(folder.parent, STAGING)  # of conversions killed mid-way: each can hold a whole model
        _remove_older_conversions(folder.parent, checkpoint.path)
        logger.info(
            "converting %s into the diffusers folder %s (once per version of the file)", checkpoint.path, folder
        )
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-{os.getpid()}-", dir=folder.parent))
        follow_umask(staging)
        try:
            convert(checkpoint, config_root=config_root, destination=staging)
            record = {
                "identity": identity,
                "source": str(checkpoint.path.resolve()),
                "sha256": file_sha256(checkpoint.path),
                "config": str(config_root),
            }
            (staging / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
            replace_folder(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def _remove_older_conversions(parent: Path, source: Path) -> None:
    """Converted folders of earlier versions of ``source`` (the file changed since): each holds a whole model (GBs)
    nobody reads any more. Conversions of the same version with other configs (``--config``) are kept."""
    current = file_identity(source)
    for folder in parent.iterdir():
        record = read_record(folder) if folder.is_dir() else {}
        if record.get("source") != str(source.resolve()):
            continue
        made_from, _, rest = str(record.get("identity", "")).partition("|")
        if made_from != current or not rest.endswith(f"|{CONVERT_FORMAT}"):
            logger.info("deleting %s, converted from an earlier version of %s", folder, source)
            shutil.rmtree(folder, ignore_errors=True)


def _components(checkpoint: Checkpoint) -> dict[str, str]:
    """diffusers component -> the key prefix of its weights in the checkpoint."""
    if checkpoint.refiner:
        return {"unet": UNET, "vae": VAE, "text_encoder_2": BIGG_REFINER}
    return {"unet": UNET, "vae": VAE, "text_encoder": CLIP_L, "text_encoder_2": BIGG_BASE}


def convert(checkpoint: Checkpoint, *, config_root: Path, destination: Path) -> None:
    """Write ``checkpoint`` as a diffusers folder at ``destination``, one component at a time, in its own dtype."""
    from safetensors import safe_open

    from sd_utils.optimize.export_models import SAFETENSORS_DTYPES  # imports torch: only when converting

    dtype = SAFETENSORS_DTYPES[checkpoint.dtype]
    index = json.loads((config_root / "model_index.json").read_text(encoding="utf-8"))
    with safe_open(checkpoint.path, framework="pt") as weights:
        keys = list(weights.keys())
        for name, prefix in _components(checkpoint).items():
            if name not in index or index[name][0] is None:
                raise ModelNotFoundError(
                    f"--config {config_root} has no {name}, which {checkpoint.path} holds; give the configs of an "
                    f"SDXL {'refiner' if checkpoint.refiner else 'base'}"
                )
            state = {key: weights.get_tensor(key) for key in keys if key.startswith(prefix)}
            module = _load_component(name, state, checkpoint=checkpoint, config_root=config_root, dtype=dtype)
            del state
            module.save_pretrained(destination / name, safe_serialization=True)
            del module
    for name in ("scheduler", "tokenizer", "tokenizer_2", "feature_extractor"):
        if (config_root / name).is_dir():
            shutil.copytree(config_root / name, destination / name)
    shutil.copy2(config_root / "model_index.json", destination / "model_index.json")


@contextlib.contextmanager
def _without_empty_fp32_note() -> Iterator[None]:
    """diffusers 0.39's ``from_single_file`` casts with ``to(dtype)`` and then warns that the modules "that should be
    kept in float32: []" (none) might be cast: a warning about nothing, on every conversion. Only that one is dropped.
    """
    noisy = logging.getLogger("diffusers.models.modeling_utils")

    def keep(record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()

    noisy.addFilter(keep)
    try:
        yield
    finally:
        noisy.removeFilter(keep)


def _load_component(name: str, state: dict, *, checkpoint: Checkpoint, config_root: Path, dtype):
    """One diffusers/transformers module from its part of the checkpoint, by diffusers' single-file converters."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    try:
        if name in ("unet", "vae"):
            cls = UNet2DConditionModel if name == "unet" else AutoencoderKL
            with _without_empty_fp32_note():
                module = cls.from_single_file(
                    state, config=str(config_root), subfolder=name, torch_dtype=dtype, local_files_only=True
                )
        else:
            # each encoder gets only its own tensors: diffusers tells the two CLIPs apart by their widths otherwise,
            # which fails for models where both have the same width
            cls = CLIPTextModel if name == "text_encoder" else CLIPTextModelWithProjection
            module = create_diffusers_clip_model_from_ldm(
                cls, state, subfolder=name, config=str(config_root), torch_dtype=dtype, local_files_only=True
            )
    except (ValueError, RuntimeError, KeyError, IndexError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelNotFoundError(
            f"--model_id {checkpoint.path}: its {name} does not fit the configs of {config_root} ({first[:200]}); "
            "pass --config DIR|ID with the diffusers configs of the checkpoint's architecture"
        ) from None
    missing = [key for key, value in module.state_dict().items() if value.device.type == "meta"]
    if missing:
        raise ModelNotFoundError(
            f"--model_id {checkpoint.path} lacks {len(missing)} {name} weight(s) the configs of {config_root} need "
            f"(e.g. {missing[0]}); pass --config DIR|ID with the configs of the checkpoint's architecture"
        )
    return module


@dataclasses.dataclass(frozen=True)
class HashedFile:
    """A weights file the user gave (a checkpoint, ``--unet``), known by its content: shown in the PNGs and the
    window, and part of the build's identity."""

    path: Path
    sha256: str

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def short_hash(self) -> str:
        """The first 10 hex digits of the SHA-256, as A1111 and Civitai show a checkpoint's hash."""
        return self.sha256[:10]

    def identity(self) -> dict:
        return {"name": self.name, "sha256": self.sha256}


def inspect_unet(path: Path, model_unet: Path) -> HashedFile:
    """Check ``--unet path`` against the model's UNet folder ``model_unet``: the same tensors, the same shapes."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"--unet {path}: no such file; check the path")
    header = read_header(path, "--unet")
    if looks_like_lora(header):
        raise ModelNotFoundError(f"--unet {path} is a LoRA; pass it with --lora FILE[:SCALE]")
    own: dict[str, dict] = {}
    for weights in sorted(model_unet.glob("*.safetensors")):
        own.update(read_header(weights, "--model_id"))
    if any(key.startswith(UNET) for key in header):
        raise ModelNotFoundError(
            f"--unet {path} is in the original (A1111) layout; give a UNet in diffusers' layout, or a whole checkpoint "
            "as --model_id"
        )
    missing = sorted(set(own) - set(header))
    extra = sorted(set(header) - set(own))
    shapes = [key for key in own if key in header and own[key]["shape"] != header[key]["shape"]]
    if missing or extra or shapes:
        first = (missing and f"no {missing[0]}") or (extra and f"an unknown {extra[0]}") or f"{shapes[0]} differs"
        raise ModelNotFoundError(
            f"--unet {path} does not fit the UNet of --model_id ({len(missing) + len(extra) + len(shapes)} "
            f"difference(s), e.g. {first}); give a UNet made for this model's architecture"
        )
    return HashedFile(path=path.resolve(), sha256=file_sha256(path))
