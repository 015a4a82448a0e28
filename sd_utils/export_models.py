"""The PyTorch modules Olive exports: each SDXL submodel wrapped to the flat signature of its IO contract.

Loaded in fp32 with the classic (non-SDPA) attention: ONNX Runtime's transformer fusions match the
MatMul/Softmax attention pattern of a TorchScript fp32 export, and fp16 is applied after fusion.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .model_spec import ModelSpec, Shape, export_shape, submodel_io


class TextEncoderExport(torch.nn.Module):
    """``input_ids`` -> first outputs (see ``model_spec``), then every hidden state."""

    def __init__(self, encoder: torch.nn.Module, *, with_projection: bool):
        super().__init__()
        self.encoder = encoder
        self.with_projection = with_projection

    def forward(self, input_ids: torch.Tensor):
        out = self.encoder(input_ids, output_hidden_states=True, return_dict=True)
        first = (
            (out.text_embeds, out.last_hidden_state)
            if self.with_projection
            else (out.last_hidden_state, out.pooler_output)
        )
        return (*first, *out.hidden_states)


class UNetExport(torch.nn.Module):
    """SDXL UNet with the ``added_cond_kwargs`` dict flattened into two inputs."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


class VaeEncoderExport(torch.nn.Module):
    """Pixels in [-1, 1] -> latent distribution parameters (mean and log-variance, as optimum expects)."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample).latent_dist.parameters


class VaeDecoderExport(torch.nn.Module):
    """Unscaled latents -> pixels in [-1, 1]."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


def load_submodel(name: str, model_path: str | Path) -> torch.nn.Module:
    """Load submodel ``name`` of the diffusers folder ``model_path`` as an fp32 export module in eval mode."""
    root = Path(model_path)
    if name in ("text_encoder", "text_encoder_2"):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        with_projection = name == "text_encoder_2"
        cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
        encoder = cls.from_pretrained(root / name, dtype=torch.float32, attn_implementation="eager")
        module: torch.nn.Module = TextEncoderExport(encoder, with_projection=with_projection)
    elif name == "unet":
        from diffusers import UNet2DConditionModel
        from diffusers.models.attention_processor import AttnProcessor

        unet = UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=torch.float32)
        unet.set_attn_processor(AttnProcessor())
        module = UNetExport(unet)
    elif name in ("vae_encoder", "vae_decoder"):
        from diffusers import AutoencoderKL
        from diffusers.models.attention_processor import AttnProcessor

        vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=torch.float32)
        vae.set_attn_processor(AttnProcessor())
        module = VaeEncoderExport(vae) if name == "vae_encoder" else VaeDecoderExport(vae)
    else:
        raise ValueError(f"unknown submodel {name!r}")
    return module.eval()


def dummy_inputs(name: str, model_path: str | Path, shape: Shape | None = None) -> tuple[torch.Tensor, ...]:
    """Export inputs for submodel ``name`` (a small shape by default: every dim is symbolic)."""
    spec = ModelSpec.from_folder(Path(model_path))
    return submodel_io(spec, name).dummy_inputs(shape or export_shape(spec))
