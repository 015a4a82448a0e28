"""``--controlnet DIR|ID|FILE[:SCALE]``: an SDXL ControlNet, found and checked against the base model before
anything is built.

A diffusers folder (``config.json`` + weights), a hub id (downloaded, or taken from the local Hugging Face cache
offline), or one ``.safetensors`` file in diffusers' layout (what ``diffusion_pytorch_model.safetensors`` of such a
folder is, and how most SDXL ControlNets are shared): its config is the base UNet's, as ``ControlNetModel.from_unet``
makes it, and every tensor is checked against it. Files in the original ``control_model.*`` layout and pickles are
refused with the way out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
from pathlib import Path
from typing import Any

from sd_utils.errors import ModelNotFoundError
from sd_utils.sources import single_file
from sd_utils.sources.model_spec import ModelSpec, control_residuals

logger = logging.getLogger(__name__)

OPTION = "--controlnet"
WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclasses.dataclass(frozen=True)
class ControlNetSource:
    """One ``--controlnet``: a diffusers ControlNet folder, its name, its scale and the identity of its weights."""

    root: Path  # config.json + weights
    name: str  # shown in PNGs (A1111's "Model: name [hash]")
    sha256: str  # of its weights file (of their digests, for weights in several files): its builds' identity
    scale: float = 1.0

    @property
    def short_hash(self) -> str:
        """A1111's ControlNet "Model: name [hash]": the first 8 hex digits of the weights' SHA-256."""
        return self.sha256[:8]


def _weight_files(root: Path) -> list[Path]:
    return sorted(path for path in root.glob("*.safetensors") if "." not in path.stem)  # no variant files


def _check_architecture(config: dict[str, Any], base: ModelSpec, given: str) -> None:
    """One line when the ControlNet cannot drive ``base``'s UNet: another cross-attention width (SD 1.5's is 768),
    no SDXL text-time embedding, or residuals of other shapes."""
    width = config.get("cross_attention_dim")
    if config.get("addition_embed_type") != "text_time" or width != base.cross_attention_dim:
        raise ModelNotFoundError(
            f"{OPTION} {given} is a ControlNet for another architecture (cross-attention width {width}, "
            f"{'SD 1.x/2.x' if width in (768, 1024) else 'not SDXL'}; the model's is {base.cross_attention_dim}); "
            "give an SDXL ControlNet"
        )
    if control_residuals(config) != base.control_residuals:
        raise ModelNotFoundError(
            f"{OPTION} {given} makes residuals of other widths than the model's UNet takes (block widths "
            f"{config.get('block_out_channels')}); give a ControlNet made for this model's architecture"
        )


def _config_from_unet(base: ModelSpec) -> dict[str, Any]:
    """A ControlNet config for ``base``'s UNet, as ``ControlNetModel.from_unet`` makes it (the UNet's settings that
    ControlNetModel takes)."""
    from diffusers import ControlNetModel

    unet = json.loads((base.root / "unet" / "config.json").read_text(encoding="utf-8"))
    accepted = set(inspect.signature(ControlNetModel.__init__).parameters) - {"self"}
    config = {key: value for key, value in unet.items() if key in accepted}
    return {"_class_name": "ControlNetModel", **config, "conditioning_channels": 3}


def _check_tensors(path: Path, config: dict[str, Any]) -> None:
    """Every tensor of the file must be one of ``config``'s ControlNet, of the same shape (a meta model: no memory)."""
    import torch
    from diffusers import ControlNetModel

    header = single_file.read_header(path, OPTION)
    with torch.device("meta"):
        expected = {
            name: tuple(value.shape) for name, value in ControlNetModel.from_config(config).state_dict().items()
        }
    found = {name: tuple(entry["shape"]) for name, entry in header.items()}
    wrong = sorted(name for name in set(expected) | set(found) if expected.get(name) != found.get(name))
    if wrong:
        raise ModelNotFoundError(
            f"{OPTION} {path}: {len(wrong)} tensor(s) differ from a ControlNet of the model's UNet (first: "
            f"{wrong[0]}); give the ControlNet's diffusers folder (with its config.json)"
        )


def _single_file(path: Path, base: ModelSpec, models_dir: Path) -> Path:
    """A diffusers folder for the ControlNet file ``path``: its config and a link to the file (no copy)."""
    header = single_file.read_header(path, OPTION)
    if any(key.startswith(("control_model.", "input_hint_block.", "zero_convs.")) for key in header):
        raise ModelNotFoundError(
            f"{OPTION} {path} is in the original (A1111 extension) layout; give the ControlNet in diffusers' layout "
            "(a folder with config.json, or its diffusion_pytorch_model.safetensors)"
        )
    if not any(key.startswith("controlnet_cond_embedding.") for key in header):
        raise ModelNotFoundError(f"{OPTION} {path} holds no ControlNet (no controlnet_cond_embedding); give one")
    config = _config_from_unet(base)
    _check_tensors(path, config)
    identity = single_file.file_identity(path)
    folder = (
        models_dir / "converted" / "controlnets" / f"{path.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"
    )
    if not (folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / WEIGHTS
        link.unlink(missing_ok=True)
        link.symlink_to(path.resolve())
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder


_RESOLVED: dict[tuple[str, str, str], ControlNetSource] = {}


def resolve_controlnet(given: str, scale: float, *, base: ModelSpec, models_dir: Path) -> ControlNetSource:
    """``--controlnet given`` for the base model ``base``; one-line :class:`ModelNotFoundError` when it is no SDXL
    ControlNet of the model's architecture. Resolved once per process (the window and jobs ask for every run)."""
    key = (given, str(base.root), str(models_dir))
    if key not in _RESOLVED:
        _RESOLVED[key] = _resolve(given, base=base, models_dir=models_dir)
    return dataclasses.replace(_RESOLVED[key], scale=scale)


def _resolve(given: str, *, base: ModelSpec, models_dir: Path) -> ControlNetSource:
    path = Path(given).expanduser()
    if path.is_file():
        single_file.refuse_pickle(path, OPTION)
        root, name = _single_file(path, base, models_dir), path.stem
    elif path.is_dir():
        root, name = path, path.name
    elif given.count("/") == 1 and not given.startswith((".", "/", "~")):
        from sd_utils.sources.models import download_snapshot

        root = download_snapshot(
            given,
            allow_patterns=["config.json", WEIGHTS],
            option=OPTION,
            fix="give a local ControlNet folder or file",
        )
        name = given.split("/")[1]
    else:
        raise ModelNotFoundError(f"{OPTION} {given}: no such folder or file, and no hub id (owner/name); check it")
    config_file = root / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(f"{OPTION} {given} has no config.json; give a ControlNet in diffusers' layout")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("_class_name") not in ("ControlNetModel", None):
        raise ModelNotFoundError(f"{OPTION} {given} is a {config.get('_class_name')}, not a ControlNet; give one")
    _check_architecture(config, base, given)
    files = _weight_files(root)
    if not files:
        raise ModelNotFoundError(f"{OPTION} {given} has no .safetensors weights; give a ControlNet with its weights")
    digests = [single_file.file_sha256(file) for file in files]  # a build follows the content, not the path
    sha256 = digests[0] if len(digests) == 1 else hashlib.sha256("|".join(digests).encode()).hexdigest()
    return ControlNetSource(root=root.resolve(), name=name, sha256=sha256)
