"""A build's identity: what went into an optimized model, the folder it lives in, and whether it is still current.

One :class:`BuildRecipe` per (source, VAE, provider family). Its digest names the output folders
(``models/optimized/<name>-<digest>/``), its record is written beside the models as ``build.json``, and
:meth:`BuildRecipe.is_current` is the one check every reader uses. Two sources that share a folder name get
different builds; a changed source gets a new one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

from sd_utils.files import folder_digest
from sd_utils.sources.builder import ARCHITECTURES, folder_format, weights_fingerprint
from sd_utils.sources.model_spec import COMPONENT_OF
from sd_utils.sources.models import ResolvedModel

logger = logging.getLogger(__name__)

BUILD_FILE = "build.json"
# bumped when what a build folder holds changes shape, so builds of an older layout are not reused
BUILD_FORMAT = 2
# what an older sdxl-olive wrote in its build folders (models/optimized/<model name>/), never read as current
LEGACY_MARKER = "sdxl_olive.json"


@dataclasses.dataclass(frozen=True)
class BuildPaths:
    """The two folders of one build: fused (``optimized``) and converted only (``unoptimized``)."""

    optimized: Path
    unoptimized: Path


def _source_identity(model: ResolvedModel) -> dict[str, Any]:
    """Where ``model`` came from and a digest of what it holds."""
    if model.model_id in ARCHITECTURES:
        arch = ARCHITECTURES[model.model_id]
        return {
            "kind": "builtin",
            "source": model.model_id,
            "weights": f"{folder_format(arch)}:{weights_fingerprint(arch)}",
        }
    if model.checkpoint is not None:  # a single file: its content and the configs it was converted with
        return {
            "kind": "file",
            "source": str(model.checkpoint.path),
            "weights": f"{model.checkpoint.sha256}:{model.config_digest}",
        }
    revision = None
    if not Path(model.model_id).expanduser().is_dir():  # a hub id: the snapshot folder is named by its commit
        revision = model.path.name
        kind, source = "hub", model.model_id
    else:
        kind, source = "folder", str(model.path)
    return {"kind": kind, "source": source, "revision": revision, "weights": folder_digest(model.path)}


def _readable(model: ResolvedModel) -> str:
    name = model.output_name.name or "model"
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)


@dataclasses.dataclass(frozen=True)
class BuildRecipe:
    """What goes into one build: the source, the VAE and the provider family it is optimized for."""

    name: str  # readable part of the folder name (the model folder's or hub repository's name)
    source: dict[str, Any]
    vae: str | None  # the fp16-fixed VAE (--use_fp16_fixed_vae) and its digest, or None for the model's own
    provider: str
    format: int = BUILD_FORMAT
    loras: tuple[dict[str, Any], ...] = ()  # --lora files fused into the weights (LoraFile.identity)
    unet: dict[str, Any] | None = None  # --unet: the UNet file that replaces the model's (HashedFile.identity)

    @classmethod
    def of(cls, model: ResolvedModel, *, provider: str, vae: str | None = None, vae_root: Path | None = None):
        """The recipe of ``model`` for ``provider``; ``vae``/``vae_root``: an fp16-fixed VAE's id and folder."""
        vae_identity = None
        if vae is not None:
            vae_identity = f"{vae}:{folder_digest(vae_root)}" if vae_root is not None and vae_root.is_dir() else vae
        return cls(
            name=_readable(model),
            source=_source_identity(model),
            vae=vae_identity,
            provider=provider,
            loras=tuple(lora.identity() for lora in model.loras),
            unet=model.unet_file.identity() if model.unet_file is not None else None,
        )

    @property
    def digest(self) -> str:
        fields = dataclasses.asdict(self)
        for name in ("loras", "unet"):  # builds without them keep the digests (folders) they had before
            if not fields[name]:
                del fields[name]
        content = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(content.encode()).hexdigest()[:8]

    def submodel_key(self, submodel: str) -> str:
        """What one submodel of this build is made from: the same key in another build means the same ONNX model
        (so a build that differs only in a LoRA of the UNet reuses the other build's VAE and text encoders)."""
        component = COMPONENT_OF[submodel]
        content = {
            "submodel": submodel,
            "source": self.source,
            "provider": self.provider,
            "format": self.format,
            "vae": self.vae if component == "vae" else None,
            "loras": [lora for lora in self.loras if component in lora["targets"]],
            "unet": self.unet if component == "unet" else None,
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def folder_name(self) -> str:
        return f"{self.name}-{self.digest}"

    def paths(self, models_dir: Path) -> BuildPaths:
        return BuildPaths(
            optimized=models_dir / "optimized" / self.folder_name,
            unoptimized=models_dir / "unoptimized" / self.folder_name,
        )

    def record(self, **extra: Any) -> dict[str, Any]:
        """``build.json``: the recipe, its digest and ``extra`` facts of the build (e.g. whether it is fused)."""
        return {**dataclasses.asdict(self), "digest": self.digest, **extra}

    def write_record(self, folder: Path, **extra: Any) -> None:
        (folder / BUILD_FILE).write_text(json.dumps(self.record(**extra), indent=2) + "\n", encoding="utf-8")

    def is_current(self, folder: Path) -> bool:
        """Whether ``folder`` holds a complete build of this recipe (its ``build.json`` says so)."""
        recorded = read_record(folder)
        return recorded is not None and recorded.get("digest") == self.digest and recorded.get("format") == self.format


def read_record(folder: Path) -> dict[str, Any] | None:
    """A build folder's ``build.json``, or None where there is none or it is damaged (not built, or not finished)."""
    try:
        record = json.loads((folder / BUILD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def build_damage(folder: Path, submodels) -> str | None:
    """What is missing or cut short in a build folder (a file deleted, a disk that filled up, a copy that stopped), or
    None when every submodel's graph parses and its external data holds every tensor it names."""
    import onnx

    for submodel in submodels:
        onnx_file = folder / submodel / "model.onnx"
        if not onnx_file.is_file():
            return f"{submodel}/model.onnx is missing"
        try:
            graph = onnx.load(str(onnx_file), load_external_data=False).graph
        except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends: the file is cut short or damaged
            return f"{submodel}/model.onnx is damaged"
        needed: dict[str, int] = {}
        for tensor in graph.initializer:
            entries = {entry.key: entry.value for entry in tensor.external_data}
            if "location" in entries:
                end = int(entries.get("offset", 0)) + int(entries.get("length", 0))
                needed[entries["location"]] = max(needed.get(entries["location"], 0), end)
        for location, size in needed.items():
            data = folder / submodel / location
            if not data.is_file() or data.stat().st_size < size:
                return f"{submodel}/{location} is {'missing' if not data.is_file() else 'cut short'}"
    return None


def legacy_folder(model: ResolvedModel, models_dir: Path) -> Path | None:
    """The folder an older sdxl-olive used for ``model`` (named after the model only), when one is there."""
    as_path = Path(model.model_id)
    name = Path(as_path.name) if as_path.is_absolute() or as_path.exists() else as_path
    folder = models_dir / "optimized" / name
    return folder if (folder / LEGACY_MARKER).is_file() else None
