"""Fuse ``--lora`` files into a model's weights before export, with diffusers' LoRA loading (PEFT underneath).

The fused UNet and text encoders are written to a staging folder the build exports from and deletes afterwards;
components no LoRA touches are exported from the model's own folder (and reused from an earlier build when one has
them, see ``olive_workflow.reusable_submodels``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

from sd_utils.errors import ModelNotFoundError
from sd_utils.sources.lora import LoraFile
from sd_utils.sources.models import copy_configs

logger = logging.getLogger(__name__)


def _load_pipeline(root: Path, unet_root: Path):
    import diffusers

    from sd_utils.optimize.export_models import stored_dtype

    index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    cls = getattr(diffusers, index["_class_name"])
    # the weights' own dtype: fp16 checkpoints are fused in fp16, as A1111 and ComfyUI do, without an fp32 copy
    dtype = stored_dtype(unet_root / "unet")
    diffusers.utils.logging.disable_progress_bar()  # "Loading pipeline components": the build logs its own steps
    try:
        unet = diffusers.UNet2DConditionModel.from_pretrained(unet_root / "unet", torch_dtype=dtype)
        return cls.from_pretrained(root, unet=unet, torch_dtype=dtype)
    finally:
        diffusers.utils.logging.enable_progress_bar()


def fuse_loras(root: Path, loras: tuple[LoraFile, ...], destination: Path, *, unet_root: Path | None = None) -> Path:
    """Write at ``destination`` a diffusers folder with ``root``'s configs and the components the LoRAs change, fused
    at their scales; raise :class:`ModelNotFoundError` naming the file of a LoRA that does not fit the model.

    ``unet_root``: a folder whose UNet replaces ``root``'s (``--unet``)."""
    pipeline = _load_pipeline(root, unet_root or root)
    names = [f"lora{index}" for index in range(len(loras))]
    for name, lora in zip(names, loras, strict=True):
        _load_one(pipeline, lora, name)
    targets = sorted({target for lora in loras for target in lora.targets})
    pipeline.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
    pipeline.fuse_lora(components=targets, adapter_names=names)
    pipeline.unload_lora_weights()
    copy_configs(root, destination)
    for target in targets:
        shutil.rmtree(destination / target, ignore_errors=True)
        getattr(pipeline, target).save_pretrained(destination / target, safe_serialization=True)
    logger.info(
        "fused %s into %s", ", ".join(f"{lora.path.name} x{lora.scale:g}" for lora in loras), ", ".join(targets)
    )
    return destination


def _load_one(pipeline, lora: LoraFile, name: str) -> None:
    """Load one LoRA as adapter ``name``; every one of its tensors must land on a module of the model."""
    from safetensors.torch import load_file

    try:
        with _diffusers_notes() as notes, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # the second LoRA's
            # the file's own tensors: diffusers converts them on the way in (kohya names, alphas, sgm block names)
            pipeline.load_lora_weights(load_file(lora.path), adapter_name=name)
    except (ValueError, RuntimeError, KeyError, IndexError) as error:
        raise ModelNotFoundError(
            f"--lora {lora.path} does not fit the model ({_first_reason(error)}); give a LoRA made for this model's "
            "architecture (an SDXL LoRA of the same sizes)"
        ) from None
    # PEFT loads the tensors it can place and only logs the others: a LoRA for another model would half apply
    unexpected = [note for note in notes if "unexpected keys" in note]
    if unexpected:
        raise ModelNotFoundError(
            f"--lora {lora.path} does not fit the model: it has layers the model has not ({unexpected[0][:160]}); "
            "give a LoRA made for this model's architecture"
        )
    loaded = {component for component, adapters in pipeline.get_list_adapters().items() if name in adapters}
    if not loaded:
        raise ModelNotFoundError(
            f"--lora {lora.path} does not fit the model: none of its layers is one of the model's; give a LoRA "
            "made for SDXL"
        )
    _check_every_layer_placed(pipeline, lora, name, components=loaded)


# the down (A) matrix of one LoRA layer in each layout diffusers reads: kohya, PEFT, diffusers' older one
_LAYER_KEYS = ("lora_down.weight", "lora_A.weight", "lora.down.weight")


def _check_every_layer_placed(pipeline, lora: LoraFile, name: str, *, components: set[str]) -> None:
    """Every LoRA layer of the file must have become an adapter layer of the model: diffusers' converters drop the
    keys they cannot map (another UNet layout), which would apply the LoRA in part, silently."""
    from safetensors import safe_open

    with safe_open(lora.path, framework="pt") as weights:
        in_file = sum(key.endswith(_LAYER_KEYS) for key in weights.keys())  # noqa: SIM118 (safe_open is no dict)
    placed = sum(
        1
        for component in components
        for _, module in getattr(pipeline, component).named_modules()
        if name in getattr(module, "lora_A", {})
    )
    if placed < in_file:
        raise ModelNotFoundError(
            f"--lora {lora.path}: {in_file - placed} of its {in_file} layers have no match in the model (it was "
            "made for another model's layout); give a LoRA made for this model"
        )


def _first_reason(error: BaseException) -> str:
    """The line of a loading error that says what differs (torch's "size mismatch for …" lines come after a
    heading)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    telling = [line for line in lines if "size mismatch" in line or "not found" in line]
    return ((telling or lines or [type(error).__name__])[0])[:200]


@contextlib.contextmanager
def _diffusers_notes() -> Iterator[list[str]]:
    """diffusers' (and PEFT's, through diffusers) warnings during the block, collected instead of printed: on a
    second adapter PEFT lists the first one's keys as missing, which is noise here."""
    from diffusers.utils import logging as diffusers_logging

    notes: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notes.append(record.getMessage())

    library = logging.getLogger("diffusers")
    handler = Collect(level=logging.WARNING)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_warning()
    diffusers_logging.disable_default_handler()
    library.addHandler(handler)
    try:
        yield notes
    finally:
        library.removeHandler(handler)
        diffusers_logging.enable_default_handler()
        diffusers_logging.set_verbosity(verbosity)
