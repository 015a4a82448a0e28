"""``--lora FILE[:SCALE]``: LoRA files checked against the model before anything is built, and their identity.

diffusers reads every LoRA layout users have (diffusers/PEFT keys, kohya/A1111 ``lora_unet_*``/``lora_te1_*``/
``lora_te2_*`` keys, in diffusers' or the original block names) and converts them to one layout; what the file
changes (UNet, text encoders) is read from that. The LoRAs are fused into the weights before export
(``sd_utils/optimize/lora_fusion.py``), so the ONNX graphs are those of a plain model.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from sd_utils.errors import ModelNotFoundError
from sd_utils.sources import single_file

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoraFile(single_file.HashedFile):
    """One ``--lora``: the file and its content hash, its scale and the components it changes."""

    scale: float = 1.0
    targets: tuple[str, ...] = ()  # diffusers components: unet, text_encoder, text_encoder_2
    tensors_sha256: str = ""  # of the tensor data alone: A1111's and Civitai's LoRA hash (its first 12 digits)

    def identity(self) -> dict[str, Any]:
        """What a build records of this LoRA (its content, not its path: a moved file is the same LoRA)."""
        return {
            **super().identity(),
            "scale": self.scale,
            "targets": list(self.targets),
            "tensors_sha256": self.tensors_sha256,
        }


def lora_state_dict(path: Path) -> dict:
    """The LoRA's tensors in diffusers' layout (keys prefixed by the component), by diffusers' own converters."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging
    from safetensors.torch import load_file

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its notes on formats it converted
    try:
        state, _ = StableDiffusionXLPipeline.lora_state_dict(load_file(path))
    except (ValueError, KeyError, RuntimeError, IndexError) as error:
        raise ModelNotFoundError(
            f"--lora {path} is in a LoRA layout diffusers cannot read ({str(error).splitlines()[0][:160]}); give an "
            "SDXL LoRA in diffusers/PEFT or kohya/A1111 format"
        ) from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return state


def inspect_lora(path: Path, scale: float, *, components: tuple[str, ...]) -> LoraFile:
    """Check ``--lora path`` against a model with ``components``; one-line :class:`ModelNotFoundError` when it is not
    a LoRA, or changes a component the model does not have."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ModelNotFoundError(f"--lora {path} is a folder; give the LoRA's .safetensors file in it")
    if not path.is_file():
        raise ModelNotFoundError(f"--lora {path}: no such file; check the path")
    header = single_file.read_header(path, "--lora")
    if not single_file.looks_like_lora(header):
        raise ModelNotFoundError(
            f"--lora {path} holds no LoRA tensors (lora_A/lora_B or lora_down/lora_up); "
            + ("it is a model checkpoint: pass it as --model_id" if _is_model(header) else "give a LoRA file")
        )
    state = lora_state_dict(path)
    targets = tuple(sorted({key.split(".", 1)[0] for key in state}))
    unknown = [target for target in targets if target not in components]
    if unknown or not targets:
        what = ", ".join(unknown) if unknown else "nothing this tool knows"
        raise ModelNotFoundError(
            f"--lora {path} changes {what}, which the model has not (it has {', '.join(components)}); "
            "give a LoRA made for this kind of model (an SDXL base LoRA for a base)"
        )
    return LoraFile(
        path=path.resolve(),
        scale=scale,
        sha256=single_file.file_sha256(path),
        targets=targets,
        tensors_sha256=single_file.file_sha256(path, tensors_only=True),
    )


def _is_model(header: dict) -> bool:
    return any(key.startswith((single_file.UNET, "down_blocks.", "conditioner.")) for key in header)
