"""Fuse ``--lora`` files into a model's weights before export, with diffusers' LoRA loading (PEFT underneath).

The fused UNet and text encoders are written to a staging folder the build exports from and deletes afterwards;
components no LoRA touches are exported from the model's own folder (and reused from an earlier build when one has
them, see ``olive_workflow.reusable_submodels``).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from sd_utils.sources.lora import LoraFile, load_adapter
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
        load_adapter(pipeline, lora, name)
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
