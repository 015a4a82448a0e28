"""Write a diffusers SDXL folder as one single-file checkpoint in the original (Stability AI / A1111 / ComfyUI) layout.

The inverse of diffusers' single-file conversion (``diffusers.loaders.single_file_utils``), which has no writer:
tests and benchmarks use it to make single-file checkpoints of models the project builds itself (no hub), and a
user can use it to hand a model to tools that read only single files. Key names follow the layout SDXL's own
checkpoints use: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE), ``conditioner.embedders.N.*``
(CLIP ViT-L in transformers' layout, OpenCLIP ViT-bigG in open_clip's layout).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _resnet(rest: str) -> str:
    name, _, tail = rest.partition(".")
    return f"{RESNET_NAMES[name]}.{tail}"


def unet_block_names(config: dict) -> dict[str, str]:
    """diffusers module prefix -> original prefix for every block of a UNet (``config``: its ``config.json``)."""
    per_block = config["layers_per_block"]
    names = {}
    for i, kind in enumerate(config["down_block_types"]):
        for j in range(per_block):
            index = (per_block + 1) * i + j + 1
            names[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{index}.0."
            if kind.startswith("CrossAttn"):
                names[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{index}.1."
        if i < len(config["down_block_types"]) - 1:
            names[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(per_block + 1) * (i + 1)}.0.op."
    for i, kind in enumerate(config["up_block_types"]):
        attention = kind.startswith("CrossAttn")
        for j in range(per_block + 1):
            names[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{(per_block + 1) * i + j}.0."
            if attention:
                names[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{(per_block + 1) * i + j}.1."
        if i < len(config["up_block_types"]) - 1:
            last = (per_block + 1) * i + per_block
            names[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{last}.{2 if attention else 1}."
    names["mid_block.resnets.0."] = "middle_block.0."
    names["mid_block.attentions.0."] = "middle_block.1."
    names["mid_block.resnets.1."] = "middle_block.2."
    return names


def unet_key(key: str, blocks: dict[str, str]) -> str:
    """The original name of a diffusers UNet parameter."""
    module, _, leaf = key.rpartition(".")
    if module in UNET_TOP:
        return f"{UNET_PREFIX}{UNET_TOP[module]}.{leaf}"
    for prefix, original in blocks.items():
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            if ".resnets." in prefix:
                rest = _resnet(rest)
            return UNET_PREFIX + original + rest
    raise KeyError(f"no original name for UNet parameter {key}")


def vae_key(key: str, num_up_blocks: int) -> str:
    """The original name of a diffusers VAE parameter (attention projections are 1x1 convolutions there)."""
    key = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", key)
    key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", key)
    key = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{num_up_blocks - 1 - int(m.group(1))}.block.", key)
    key = re.sub(
        r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{num_up_blocks - 1 - int(m.group(1))}.upsample.", key
    )
    key = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", key)
    key = key.replace("mid_block.attentions.0.", "mid.attn_1.").replace("conv_norm_out", "norm_out")
    key = key.replace("conv_shortcut", "nin_shortcut")
    for ours, original in (
        ("group_norm", "norm"),
        ("to_q", "q"),
        ("to_k", "k"),
        ("to_v", "v"),
        ("to_out.0", "proj_out"),
    ):
        key = key.replace(f"attn_1.{ours}.", f"attn_1.{original}.")
    return VAE_PREFIX + key


def open_clip_tensors(state: dict[str, torch.Tensor], prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """OpenCLIP's names for a ``CLIPTextModelWithProjection`` state dict (q/k/v packed as ``in_proj``)."""
    fixed = {
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    layer_names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for key, tensor in state.items():
        if key in fixed:
            yield prefix + fixed[key], tensor
        elif key == "text_projection.weight":
            yield prefix + "text_projection", tensor.T.contiguous()
        elif match := re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key):
            layer, module, leaf = match.groups()
            base = f"{prefix}transformer.resblocks.{layer}."
            if module == "self_attn.q_proj":
                packed = [state[key.replace("q_proj", name)] for name in ("q_proj", "k_proj", "v_proj")]
                yield f"{base}attn.in_proj_{leaf}", torch.cat(packed)
            elif module == "self_attn.out_proj":
                yield f"{base}attn.out_proj.{leaf}", tensor
            elif module in layer_names:
                yield f"{base}{layer_names[module]}.{leaf}", tensor


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(path))
    return state


def original_state_dict(root: Path) -> dict[str, torch.Tensor]:
    """The weights of diffusers SDXL folder ``root`` (base or refiner) under their original names."""
    root = Path(root)
    unet_config = json.loads((root / "unet" / "config.json").read_text())
    blocks = unet_block_names(unet_config)
    out = {unet_key(key, blocks): tensor for key, tensor in _state(root / "unet").items()}
    num_up = len(json.loads((root / "vae" / "config.json").read_text())["up_block_types"])
    out.update(
        (vae_key(key, num_up), tensor[..., None, None] if _is_vae_projection(key) else tensor)
        for key, tensor in _state(root / "vae").items()
    )
    refiner = not (root / "text_encoder" / "config.json").is_file()
    if not refiner:
        out.update(
            ("conditioner.embedders.0.transformer." + key, tensor)
            for key, tensor in _state(root / "text_encoder").items()
        )
    bigg = "conditioner.embedders.0.model." if refiner else "conditioner.embedders.1.model."
    out.update(open_clip_tensors(_state(root / "text_encoder_2"), bigg))
    return out


def _is_vae_projection(key: str) -> bool:
    return "attentions.0." in key and key.endswith(".weight") and "group_norm" not in key


def write_single_file(root: Path, destination: Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write diffusers SDXL folder ``root`` as single-file checkpoint ``destination`` (``.safetensors``), optionally
    cast to ``dtype``."""
    from safetensors.torch import save_file

    state = original_state_dict(root)
    if dtype is not None:
        state = {key: tensor.to(dtype) for key, tensor in state.items()}
    save_file(state, str(destination))
    return Path(destination)
