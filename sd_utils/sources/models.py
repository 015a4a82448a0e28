"""Turn ``--model_id`` into a local diffusers folder: a built-in architecture, a local folder, a single-file
checkpoint (converted once), or a hub id."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from sd_utils.errors import ModelNotFoundError
from sd_utils.files import exclusive, folder_digest, follow_umask, replace_folder
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
# what an SDXL hub repository needs for us besides weights: configs and tokenizers (of subfolders only: SDXL's repos
# also hold a 7-GB single-file copy at the top)
CONFIG_ALLOW_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt"]
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
PLAIN = "fp32"  # --variant's name for the plain (variant-less) weight files


# the configs (no weights) of these architectures describe single files of SDXL 1.0's sizes when --config is not given
STANDARD_CONFIGS = {False: "random-sdxl-base", True: "random-sdxl-refiner"}


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    model_id: str
    path: Path
    spec: ModelSpec
    checkpoint: single_file.HashedFile | None = None  # set when --model_id is a single file
    config_digest: str | None = None  # of the configs a single file was converted with
    loras: tuple = ()  # sources.lora.LoraFile, fused into the weights before export (--lora)
    unet_file: single_file.HashedFile | None = None  # a UNet that replaces the model's (--unet)

    def describe(self) -> str:
        """One line on what is loaded: the model (a single file with its short hash) and the LoRAs with scales."""
        text = self.model_id
        if self.checkpoint is not None:
            text = f"{self.checkpoint.path.name} ({self.checkpoint.short_hash})"
        if self.unet_file is not None:
            text += f" + UNet {self.unet_file.path.name} ({self.unet_file.short_hash})"
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
    model_id: str,
    *,
    models_dir: Path,
    config: str | None = None,
    variant: str | None = None,
    option: str = "--model_id",
) -> ResolvedModel:
    """Find or create the diffusers folder of ``model_id``; raises :class:`ModelNotFoundError` with the fix.

    ``config``: for a single-file ``model_id``, a diffusers folder or hub id whose configs describe it (default: SDXL
    1.0's own, written locally); ``variant``: for a hub id, which weight files (``--variant``)."""
    as_path = Path(model_id).expanduser()
    if model_id in ARCHITECTURES:
        path = ensure_builtin(model_id, models_dir=models_dir)
    elif as_path.is_dir():
        path = as_path.resolve()
        single_file.check_folder_weights(path, option)
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
        path = hub_model(model_id, variant=variant, option=option, models_dir=models_dir)
    return ResolvedModel(model_id=model_id, path=path, spec=ModelSpec.from_folder(path))


def _resolve_single_file(model_id: str, file: Path, *, models_dir: Path, config: str | None, option: str):
    checkpoint = single_file.classify(file, single_file.read_header(file, option), option)
    config_root = config_folder(config, checkpoint=checkpoint, models_dir=models_dir)
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
        checkpoint=single_file.HashedFile(path=file.resolve(), sha256=sha256),
        config_digest=digest,
    )


def config_folder(config: str | None, *, checkpoint: single_file.Checkpoint, models_dir: Path) -> Path:
    """The diffusers configs (and tokenizers) ``checkpoint`` is converted with: ``config`` (a folder or a hub id, of
    which only configs are downloaded), or SDXL 1.0's base, inpainting or refiner configs written locally."""
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
    arch = ARCHITECTURES[STANDARD_CONFIGS[checkpoint.refiner]]
    kind = "-inpainting" if checkpoint.inpainting else ""
    root = models_dir / "configs" / f"{arch.name}{kind}-{folder_format(arch)}"
    if not (root / "model_index.json").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(root.with_name(f".{root.name}.lock"), waiting_for=f"writing {root}"):
            if not (root / "model_index.json").is_file():
                staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-{os.getpid()}-", dir=root.parent))
                follow_umask(staging)
                write_configs(arch, staging, inpainting=checkpoint.inpainting)
                replace_folder(staging, root)
    return root


def weight_patterns(variant: str) -> list[str]:
    """Hub file patterns of one variant's weights (``fp32``: the plain files), sharded or not."""
    if variant == PLAIN:
        return [
            f"*/{stem}{suffix}"
            for stem in WEIGHT_STEMS
            for suffix in (".safetensors", "-*-of-*.safetensors", ".safetensors.index.json")
        ]
    return [
        f"*/{stem}{suffix}"
        for stem in WEIGHT_STEMS
        for suffix in (
            f".{variant}.safetensors",
            f".{variant}-*-of-*.safetensors",
            f".safetensors.index.{variant}.json",
        )
    ]


def _variant_of(name: str) -> str | None:
    """The variant a weight file belongs to (``fp32`` for plain ones), None for other files."""
    for stem in WEIGHT_STEMS:
        if name in (f"{stem}.safetensors", f"{stem}.safetensors.index.json") or re.fullmatch(
            rf"{stem}-\d+-of-\d+\.safetensors", name
        ):
            return PLAIN
        match = re.fullmatch(rf"{stem}\.([A-Za-z0-9_]+)(?:-\d+-of-\d+)?\.safetensors", name) or re.fullmatch(
            rf"{stem}\.safetensors\.index\.([A-Za-z0-9_]+)\.json", name
        )
        if match:
            return match.group(1)
    return None


def choose_variant(model_id: str, files: list[str], requested: str | None, components: list[str], option: str) -> str:
    """The variant of ``model_id``'s weights to use: ``requested``, else fp16 where every component has it, else the
    plain files; a one-line error when there is none (pickled weights only, say)."""
    have: dict[str, set[str]] = {}
    for file in files:
        folder, _, name = file.rpartition("/")
        variant = _variant_of(name)
        if folder in components and variant is not None:
            have.setdefault(variant, set()).add(folder)
    complete = sorted(variant for variant, folders in have.items() if folders >= set(components))
    if requested is not None:
        if requested in complete:
            return requested
        raise ModelNotFoundError(
            f"--variant {requested}: {model_id} has no {requested} safetensors weights for every component; it has: "
            f"{', '.join(complete) or 'none'}"
        )
    for variant in ("fp16", PLAIN):
        if variant in complete:
            return variant
    if complete:
        return complete[0]
    if any(file.endswith((".bin", ".ckpt", ".pt", ".pth")) for file in files):
        raise ModelNotFoundError(
            f"{option} {model_id} has only pickled weights (.bin): {single_file.PICKLE_FIX}, or use a repository "
            "with .safetensors weights"
        )
    raise ModelNotFoundError(f"{option} {model_id} has no safetensors weights for {', '.join(components)}")


def _hub_files(model_id: str) -> list[str] | None:
    """The repository's file list, or None when the hub cannot be asked (offline)."""
    from huggingface_hub import HfApi

    try:
        return HfApi().list_repo_files(model_id)
    except Exception:  # noqa: BLE001 - offline, unreachable, unknown repo: the local cache is tried next
        return None


def hub_model(model_id: str, *, variant: str | None, option: str, models_dir: Path) -> Path:
    """A diffusers folder of hub model ``model_id`` with the chosen variant's weights under their plain names (links
    into the Hugging Face cache), so that every loader reads the right files."""
    fix = f"connect to the hub, pass a local diffusers folder, or use a built-in model ({', '.join(BUILTIN_MODELS)})"
    files = _hub_files(model_id)
    snapshot = download_snapshot(model_id, allow_patterns=CONFIG_ALLOW_PATTERNS, option=option, fix=fix)
    if files is None:  # offline: choose among the files the local cache has
        files = [path.relative_to(snapshot).as_posix() for path in snapshot.rglob("*") if path.is_file()]
    index = json.loads((snapshot / "model_index.json").read_text(encoding="utf-8"))
    components = [name for name in ("unet", "vae", "text_encoder", "text_encoder_2") if (index.get(name) or [None])[0]]
    chosen = choose_variant(model_id, files, variant, components, option)
    snapshot = download_snapshot(
        model_id, allow_patterns=CONFIG_ALLOW_PATTERNS + weight_patterns(chosen), option=option, fix=fix
    )
    logger.info("%s: using its %s weights", model_id, "plain (fp32)" if chosen == PLAIN else chosen)
    return _variant_view(
        snapshot, chosen, models_dir / "hub" / f"{model_id.replace('/', '--')}-{snapshot.name[:12]}-{chosen}"
    )


def _variant_view(snapshot: Path, variant: str, destination: Path) -> Path:
    """``snapshot`` seen with only ``variant``'s weights, under plain names: links (copies where links fail)."""
    if (destination / "model_index.json").is_file():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=destination.parent))
    for path in sorted(snapshot.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(snapshot)
        found = _variant_of(path.name)
        if found is not None and found != variant:
            continue
        name = path.name
        if found is not None and variant != PLAIN:
            name = name.replace(f".safetensors.index.{variant}.json", ".safetensors.index.json")
            name = name.replace(f".{variant}.safetensors", ".safetensors")
        target = staging / relative.parent / name
        target.parent.mkdir(parents=True, exist_ok=True)
        _link(path.resolve(), target)
    try:
        staging.rename(destination)
    except OSError:  # another run made it first
        shutil.rmtree(staging, ignore_errors=True)
        if not (destination / "model_index.json").is_file():
            raise
    return destination


def _link(source: Path, target: Path) -> None:
    """A symbolic link, else a hard link (Windows without the symlink privilege), else a copy."""
    for make in (os.symlink, os.link):
        try:
            make(source, target)
            return
        except OSError:
            continue
    shutil.copy2(source, target)


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


def with_unet(root: Path, unet_file: Path, destination: Path) -> Path:
    """Write at ``destination`` a diffusers folder with ``root``'s configs and ``unet_file`` as its UNet weights (a
    link to the file where the system allows, else a copy)."""
    copy_configs(root, destination)
    _link(Path(unet_file).resolve(), destination / "unet" / "diffusion_pytorch_model.safetensors")
    return destination


def with_vae(model: ResolvedModel, vae: str, *, destination: Path) -> Path:
    """Write at ``destination`` a diffusers folder that is ``model`` with its ``vae`` replaced by ``vae`` (a
    folder or hub id of an ``AutoencoderKL``). Only configs are copied besides the VAE: the VAE workflows read the
    other components' configs for the model facts, never their weights."""
    import json
    import shutil

    source = Path(vae).expanduser()
    if source.is_dir():
        single_file.check_folder_weights(source, "--use_fp16_fixed_vae")
    else:
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
    tiny = config.get("_class_name") == "AutoencoderTiny"
    for key in ("latent_channels",) if tiny else ("latent_channels", "block_out_channels"):
        if config.get(key) != original.get(key):
            raise ModelNotFoundError(
                f"--vae {vae} has {key}={config.get(key)}, the model's VAE has {original.get(key)}; use a VAE made "
                "for this model's latents (SDXL's: madebyollin/sdxl-vae-fp16-fix or madebyollin/taesdxl)"
            )
    if destination.exists():
        shutil.rmtree(destination)
    copy_configs(model.spec.root, destination)
    shutil.rmtree(destination / "vae")
    shutil.copytree(source, destination / "vae", ignore=shutil.ignore_patterns(".*"))
    if tiny and "block_out_channels" not in config:  # what diffusers' pipelines read the VAE's scale from
        config["block_out_channels"] = config["decoder_block_out_channels"]
        (destination / "vae" / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return destination


def copy_configs(root: Path, destination: Path) -> None:
    """``root``'s model index and every component's configs/tokenizer files (what the export reads besides weights)."""
    destination.mkdir(parents=True, exist_ok=True)
    shutil.copy2(root / "model_index.json", destination / "model_index.json")
    for component in root.iterdir():
        if component.is_dir():
            for item in component.iterdir():
                if item.is_file() and item.suffix in (".json", ".txt"):
                    (destination / component.name).mkdir(exist_ok=True)
                    shutil.copy2(item, destination / component.name / item.name)
