"""Test helpers: small deterministic LoRA files for the tiny SDXL models, in the two layouts users have.

* :func:`write_peft_lora`: diffusers/PEFT keys (``unet.….lora_A.weight``), written by diffusers' own
  ``save_lora_weights`` from PEFT adapters, optionally touching the text encoders too.
* :func:`write_kohya_lora`: kohya/A1111 keys (``lora_unet_input_blocks_4_1_…lora_down.weight`` + ``.alpha``) with the
  UNet named in the original (sgm) layout, as Civitai's SDXL LoRAs are.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _linear_modules(module: torch.nn.Module, targets) -> list[tuple[str, torch.nn.Linear]]:
    return [
        (name, layer)
        for name, layer in module.named_modules()
        if isinstance(layer, torch.nn.Linear) and any(name.endswith(target) for target in targets)
    ]


def write_peft_lora(
    root: Path, destination: Path, *, rank: int = 4, seed: int = 0, text_encoders: bool = True, std: float = 0.3
) -> Path:
    """A diffusers/PEFT LoRA for the diffusers SDXL folder ``root`` (UNet attention, and text encoders' attention);
    ``std``: of its random up and down matrices (0.3 changes a tiny model's images visibly; trained LoRAs change a
    full-size model's weights far less)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    generator = torch.Generator().manual_seed(seed)
    layers = {}
    unet = UNet2DConditionModel.from_pretrained(root / "unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(UNET_TARGETS), init_lora_weights=False))
    layers["unet_lora_layers"] = unet
    if text_encoders:
        for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            if (root / name).is_dir():
                encoder = cls.from_pretrained(root / name)
                encoder.add_adapter(
                    LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TEXT_TARGETS), init_lora_weights=False)
                )
                layers[f"{name}_lora_layers"] = encoder
    tensors = {}
    for key, model in layers.items():
        state = get_peft_model_state_dict(model)
        # deterministic weights of a size that changes the images visibly
        tensors[key] = {name: torch.randn(value.shape, generator=generator) * std for name, value in state.items()}
    destination.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(
        destination.parent, weight_name=destination.name, safe_serialization=True, **tensors
    )
    return destination


def _sgm_name(diffusers_name: str, unet_config: dict) -> str:
    from sd_utils.sources.original_layout import unet_block_names

    for prefix, original in unet_block_names(unet_config).items():
        if diffusers_name.startswith(prefix):
            return original + diffusers_name[len(prefix) :]
    raise KeyError(diffusers_name)


def write_kohya_lora(
    root: Path, destination: Path, *, rank: int = 4, alpha: float = 2.0, seed: int = 1, text_encoders: bool = False
) -> Path:
    """A kohya/A1111 LoRA for ``root``: UNet attention in sgm block names, with an ``alpha`` per module; with
    ``text_encoders``, the text encoders' attention too (``lora_te1_*``, ``lora_te2_*``)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    generator = torch.Generator().manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(root / "unet")
    config = json.loads((root / "unet" / "config.json").read_text())
    modules = [
        ("lora_unet_" + _sgm_name(name, config), layer)
        for name, layer in _linear_modules(unet, UNET_TARGETS)
        if ".attentions." in name
    ]
    if text_encoders:
        for prefix, folder, cls in (("lora_te1_", "text_encoder", CLIPTextModel),
                                    ("lora_te2_", "text_encoder_2", CLIPTextModelWithProjection)):  # fmt: skip
            if (root / folder).is_dir():
                encoder = cls.from_pretrained(root / folder)
                modules += [(prefix + name, layer) for name, layer in _linear_modules(encoder, TEXT_TARGETS)]
    tensors = {}
    for name, layer in modules:
        kohya = re.sub(r"[.]", "_", name)
        tensors[f"{kohya}.lora_down.weight"] = torch.randn(rank, layer.in_features, generator=generator) * 0.3
        tensors[f"{kohya}.lora_up.weight"] = torch.randn(layer.out_features, rank, generator=generator) * 0.3
        tensors[f"{kohya}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(destination))
    return destination


def diffusers_images(root: Path, loras: list[tuple[Path, float]], latents: torch.Tensor, call: dict):
    """diffusers' PyTorch SDXL pipeline of ``root`` with ``loras`` loaded unfused at their scales, on ``latents``."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    pipeline = StableDiffusionXLPipeline.from_pretrained(root, torch_dtype=torch.float32)
    names = []
    for index, (path, _scale) in enumerate(loras):
        pipeline.load_lora_weights(load_file(path), adapter_name=f"l{index}")
        names.append(f"l{index}")
    if names:
        pipeline.set_adapters(names, adapter_weights=[scale for _path, scale in loras])
    return pipeline(latents=latents.clone(), **call).images


def write_controlnet(root: Path, destination: Path, *, seed: int = 0, strength: float = 0.5) -> Path:
    """A ControlNet for the diffusers SDXL folder ``root`` (``ControlNetModel.from_unet``: the UNet's encoder), with
    its zero-initialized output convolutions made random, so that the control changes the image."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    generator = torch.Generator().manual_seed(seed)
    controlnet = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(root / "unet"))
    with torch.no_grad():
        for name, parameter in controlnet.named_parameters():
            if name.startswith(
                ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
            ):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * strength)
    controlnet.save_pretrained(destination, safe_serialization=True)
    return destination
