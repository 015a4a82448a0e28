"""Turn ``--model_id`` into a local diffusers folder: a built-in architecture, a local folder, a single-file
checkpoint (converted once), or a hub id."""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import tempfile
from pathlib import Path

from sd_utils.errors import ModelNotFoundError
from sd_utils.files import exclusive, folder_digest, follow_umask
from sd_utils.sources import single_file
from sd_utils.sources.builder import (
    ARCHITECTURES,
    build_record,
    folder_format,
    materialize,
    weights_fingerprint,
    write_configs,
)
from sd_utils.sources.model_spec import COMPONENT_OF, ModelSpec

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


# the configs (no weights) of these architectures describe single files of SDXL 1.0's sizes when --config is not given
STANDARD_CONFIGS = {False: "random-sdxl-base", True: "random-sdxl-refiner"}


@dataclasses.dataclass(frozen=True)
class CheckpointFile:
    """The single file a model was converted from: shown in the PNGs' metadata and the window."""

    path: Path
    sha256: str

    @property
    def short_hash(self) -> str:
        """The first 10 hex digits of the file's SHA-256, as A1111 and Civitai show a checkpoint's hash."""
        return self.sha256[:10]


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    model_id: str
    path: Path
    spec: ModelSpec
    checkpoint: CheckpointFile | None = None  # set when --model_id is a single file
    config_digest: str | None = None  # of the configs a single file was converted with
    loras: tuple = ()  # sources.lora.LoraFile, fused into the weights before export (--lora)

    def describe(self) -> str:
        """One line on what is loaded: the model (a single file with its short hash) and the LoRAs with scales."""
        text = self.model_id
        if self.checkpoint is not None:
            text = f"{self.checkpoint.path.name} ({self.checkpoint.short_hash})"
        if self.loras:
            text += " + LoRA " + ", ".join(f"{lora.name} x{lora.scale:g} ({lora.short_hash})" for lora in self.loras)
        return text

    @property
    def components(self) -> tuple[str, ...]:
        """The diffusers components with weights: what a LoRA may change."""
        return tuple(dict.fromkeys(COMPONENT_OF[submodel] for submodel in self.spec.submodels))

    @property
    def output_name(self) -> Path:
        """Relative folder under ``models/{optimized,unoptimized}``: the hub id, a local folder's or file's name."""
        if self.checkpoint is not None:
            return Path(self.checkpoint.path.stem)
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


def resolve_model(
    model_id: str, *, models_dir: Path, config: str | None = None, option: str = "--model_id"
) -> ResolvedModel:
    """Find or create the diffusers folder of ``model_id``; raises :class:`ModelNotFoundError` with the fix.

    ``config``: for a single-file ``model_id``, a diffusers folder or hub id whose configs describe it (default: SDXL
    1.0's own, written locally)."""
    as_path = Path(model_id).expanduser()
    if model_id in ARCHITECTURES:
        path = ensure_builtin(model_id, models_dir=models_dir)
    elif as_path.is_dir():
        path = as_path.resolve()
    elif as_path.is_file():
        return _resolve_single_file(model_id, as_path, models_dir=models_dir, config=config, option=option)
    elif as_path.suffix.lower() in (".safetensors", *single_file.PICKLE_SUFFIXES):
        raise ModelNotFoundError(f"{option} {model_id}: no such file; check the path")
    elif model_id.startswith((".", "/", "~")) or model_id.count("/") != 1:
        raise ModelNotFoundError(
            f"{option} {model_id!r} is not a diffusers folder, a .safetensors checkpoint, a hub id (owner/name) or a "
            f"built-in model; use one of those, e.g. one of: {', '.join(BUILTIN_MODELS)}"
        )
    else:
        path = download_snapshot(
            model_id,
            allow_patterns=HUB_ALLOW_PATTERNS,
            option=option,
            fix="connect to the hub, pass a local diffusers folder, or use a built-in model "
            f"({', '.join(BUILTIN_MODELS)})",
        )
    return ResolvedModel(model_id=model_id, path=path, spec=ModelSpec.from_folder(path))


def _resolve_single_file(model_id: str, file: Path, *, models_dir: Path, config: str | None, option: str):
    checkpoint = single_file.classify(file, single_file.read_header(file, option), option)
    config_root = config_folder(config, refiner=checkpoint.refiner, models_dir=models_dir)
    digest = folder_digest(config_root)
    path = single_file.converted_folder(
        checkpoint, config_root=config_root, config_digest=digest, models_dir=models_dir
    )
    spec = ModelSpec.from_folder(path)
    if spec.is_refiner != checkpoint.refiner:
        kind = "a refiner" if checkpoint.refiner else "a base model"
        raise ModelNotFoundError(f"{option} {file} is {kind} but --config {config} is not; give the configs of {kind}")
    sha256 = single_file.read_record(path)["sha256"]
    return ResolvedModel(
        model_id=model_id,
        path=path,
        spec=spec,
        checkpoint=CheckpointFile(path=file.resolve(), sha256=sha256),
        config_digest=digest,
    )


CONFIG_ALLOW_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt"]


def config_folder(config: str | None, *, refiner: bool, models_dir: Path) -> Path:
    """The diffusers configs (and tokenizers) a single file is converted with: ``config`` (a folder or a hub id, of
    which only configs are downloaded), or SDXL 1.0's base or refiner configs written locally."""
    if config:
        if Path(config).expanduser().is_dir():
            root = Path(config).expanduser().resolve()
        else:
            root = download_snapshot(
                config, allow_patterns=CONFIG_ALLOW_PATTERNS, option="--config", fix="give a local diffusers folder"
            )
        if not (root / "model_index.json").is_file():
            raise ModelNotFoundError(f"--config {config} has no model_index.json; give a diffusers model folder")
        return root
    arch = ARCHITECTURES[STANDARD_CONFIGS[refiner]]
    root = models_dir / "configs" / f"{arch.name}-{folder_format(arch)}"
    if not (root / "model_index.json").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(root.with_name(f".{root.name}.lock"), waiting_for=f"writing {root}"):
            if not (root / "model_index.json").is_file():
                staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
                follow_umask(staging)
                write_configs(arch, staging)
                shutil.rmtree(root, ignore_errors=True)
                staging.rename(root)
    return root


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
