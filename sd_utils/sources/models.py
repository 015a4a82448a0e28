"""Turn ``--model_id`` into a local diffusers folder: a built-in architecture, a local folder, or a hub id."""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
from pathlib import Path

from sd_utils.errors import ModelNotFoundError
from sd_utils.files import exclusive
from sd_utils.sources.builder import ARCHITECTURES, build_record, folder_format, materialize, weights_fingerprint
from sd_utils.sources.model_spec import ModelSpec

logger = logging.getLogger(__name__)

BUILTIN_MODELS = tuple(ARCHITECTURES)
# what an SDXL hub repository needs for us: configs, tokenizers and the fp32 safetensors of each component
HUB_ALLOW_PATTERNS = [
    "model_index.json",
    "*/*.json",
    "*/*.txt",
    "*/diffusion_pytorch_model.safetensors",
    "*/model.safetensors",
]


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    model_id: str
    path: Path
    spec: ModelSpec

    @property
    def output_name(self) -> Path:
        """Relative folder under ``models/{optimized,unoptimized}``: the hub id, or a local folder's name."""
        as_path = Path(self.model_id)
        return Path(as_path.name) if as_path.is_absolute() or as_path.exists() else as_path


def builtin_path(models_dir: Path, name: str) -> Path:
    return models_dir / "builtin" / name


def _builtin_current(arch, path: Path) -> bool:
    record = build_record(path)
    made = record.get("weights") == weights_fingerprint(arch) and record.get("format") == folder_format(arch)
    return (path / "model_index.json").is_file() and made


def ensure_builtin(name: str, *, models_dir: Path) -> Path:
    """The folder of built-in model ``name``, built first if missing or made from older shipped weights. Runs that
    start together build it once (the others wait); half-built folders of killed runs are deleted."""
    arch, path = ARCHITECTURES[name], builtin_path(models_dir, name)
    if _builtin_current(arch, path):
        return path
    with exclusive(path.with_name(f".{name}.lock"), waiting_for=f"building {path}"):
        # only the lock's holder builds this model: any staging folder of it (materialize's) is a killed run's
        staging = re.compile(rf"^\.{re.escape(name)}-(?:\d+-)?[a-z0-9_]{{8}}$")
        for stale in path.parent.iterdir():
            if stale.is_dir() and staging.match(stale.name):
                logger.info("deleting %s, left behind by a build that was killed", stale)
                shutil.rmtree(stale, ignore_errors=True)
        if not _builtin_current(arch, path):
            if path.exists():
                logger.info("the shipped %s weights changed since %s was built: rebuilding it", name, path)
            materialize(arch, path)
    return path


def resolve_model(model_id: str, *, models_dir: Path) -> ResolvedModel:
    """Find or create the diffusers folder of ``model_id``; raises :class:`ModelNotFoundError` with the fix."""
    if model_id in ARCHITECTURES:
        path = ensure_builtin(model_id, models_dir=models_dir)
    elif Path(model_id).expanduser().is_dir():
        path = Path(model_id).expanduser().resolve()
    elif Path(model_id).expanduser().exists() or model_id.startswith((".", "/", "~")) or model_id.count("/") != 1:
        raise ModelNotFoundError(
            f"--model_id {model_id!r} is not a diffusers folder, a hub id (owner/name) or a built-in model; "
            f"use a folder with model_index.json, a hub id, or one of: {', '.join(BUILTIN_MODELS)}"
        )
    else:
        path = download_snapshot(
            model_id,
            allow_patterns=HUB_ALLOW_PATTERNS,
            option="--model_id",
            fix="connect to the hub, pass a local diffusers folder, or use a built-in model "
            f"({', '.join(BUILTIN_MODELS)})",
        )
    return ResolvedModel(model_id=model_id, path=path, spec=ModelSpec.from_folder(path))


def download_snapshot(model_id: str, *, allow_patterns: list[str], option: str, fix: str) -> Path:
    """Fetch ``model_id`` from the hub, or take it from the local Hugging Face cache when offline; raise
    :class:`ModelNotFoundError` naming ``option`` and ``fix`` when neither works."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, allow_patterns=allow_patterns))
    except Exception as online_error:  # noqa: BLE001 - any hub failure: fall back to the cache, then explain
        try:
            return Path(snapshot_download(model_id, allow_patterns=allow_patterns, local_files_only=True))
        except Exception:  # noqa: BLE001
            raise ModelNotFoundError(
                f"{option} {model_id!r} could not be downloaded ({type(online_error).__name__}) and is not in the "
                f"local Hugging Face cache; {fix}"
            ) from None


DEFAULT_FP16_VAE = "madebyollin/sdxl-vae-fp16-fix"
VAE_ALLOW_PATTERNS = ["config.json", "diffusion_pytorch_model.safetensors"]


def composed_with_vae_path(model: ResolvedModel, vae: str, *, models_dir: Path) -> Path:
    """Where :func:`with_vae` composes ``model`` with ``vae`` (known without downloading or copying anything)."""
    return models_dir / "composed" / f"{model.output_name.name}+{Path(vae).name}"


def with_vae(model: ResolvedModel, vae: str, *, destination: Path) -> Path:
    """Write at ``destination`` a diffusers folder that is ``model`` with its ``vae`` replaced by ``vae`` (a
    folder or hub id of an ``AutoencoderKL``). Only configs are copied besides the VAE: the VAE workflows read the
    other components' configs for the model facts, never their weights."""
    import json
    import shutil

    source = Path(vae).expanduser()
    if not source.is_dir():
        source = download_snapshot(
            vae,
            allow_patterns=VAE_ALLOW_PATTERNS,
            option="--use_fp16_fixed_vae",
            fix="pass a local AutoencoderKL folder",
        )
    try:
        config = json.loads((source / "config.json").read_text())
    except FileNotFoundError:
        raise ModelNotFoundError(
            f"--use_fp16_fixed_vae {vae}: no config.json; give a folder with an AutoencoderKL (config.json + weights)"
        ) from None
    original = json.loads((model.spec.root / "vae" / "config.json").read_text())
    for key in ("latent_channels", "block_out_channels"):
        if config.get(key) != original.get(key):
            raise ModelNotFoundError(
                f"--use_fp16_fixed_vae {vae} has {key}={config.get(key)}, the model's VAE has {original.get(key)}; "
                "use the fp16-fixed VAE made for this model"
            )
    composed = destination
    if composed.exists():
        shutil.rmtree(composed)
    composed.mkdir(parents=True)
    shutil.copy2(model.spec.root / "model_index.json", composed / "model_index.json")
    for component in model.spec.root.iterdir():
        if component.is_dir() and component.name != "vae":
            for item in component.glob("*.json"):
                (composed / component.name).mkdir(exist_ok=True)
                shutil.copy2(item, composed / component.name / item.name)
    shutil.copytree(source, composed / "vae", ignore=shutil.ignore_patterns(".*"))
    return composed
