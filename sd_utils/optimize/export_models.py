"""The PyTorch modules Olive exports: each SDXL submodel wrapped to the flat signature of its IO contract.

Loaded in the dtype its weights are stored in (fp16 for SDXL: half the memory), with the classic (non-SDPA)
attention. The convert pass exports fp32 (``"torch_dtype": "float32"`` in the configs): ONNX Runtime's transformer
fusions match the MatMul/Softmax attention pattern of a TorchScript fp32 export, and fp16 is applied after fusion.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sd_utils.sources.model_spec import ModelSpec, Shape, export_shape, submodel_io


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


class ControlledUNetExport(torch.nn.Module):
    """The UNet with a ControlNet's residuals as inputs (down blocks' in order, then the mid block's)."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, *residuals):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            added_cond_kwargs=added,
            down_block_additional_residuals=residuals[:-1],
            mid_block_additional_residual=residuals[-1],
            return_dict=False,
        )[0]


class RefreshUNetExport(UNetExport):
    """The UNet (DeepCache's full step) -> its noise prediction and the input of its last up block, the feature the
    shallow steps reuse."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__(unet)
        self._feature: list[torch.Tensor] = []
        unet.up_blocks[-1].register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, module, args, kwargs):
        self._feature.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        self._feature.clear()
        out = super().forward(sample, timestep, encoder_hidden_states, text_embeds, time_ids)
        return out, self._feature[-1]


class ShallowUNetExport(torch.nn.Module):
    """DeepCache's shallow step: the UNet's time embedding, ``conv_in``, its first down block (without the
    downsampler, whose output only deeper blocks read), then its last up block on the cached feature with those
    skips, and the output layers: diffusers' own blocks, in the order ``UNet2DConditionModel.forward`` runs them.
    Inputs: the UNet's (``encoder_hidden_states`` only when these blocks attend to the text), then the feature."""

    def __init__(self, unet: torch.nn.Module, *, cross_attention: bool):
        super().__init__()
        self.unet = unet
        self.cross_attention = cross_attention
        self.first = unet.down_blocks[0]
        self.first.downsamplers = None
        self.last = unet.up_blocks[-1]
        unet.mid_block = None  # the deep blocks: not part of this graph
        unet.down_blocks = torch.nn.ModuleList()
        unet.up_blocks = torch.nn.ModuleList()

    def forward(self, sample, timestep, *rest):
        unet = self.unet
        text, (text_embeds, time_ids, feature) = (rest[0], rest[1:]) if self.cross_attention else (None, rest)
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=text, added_cond_kwargs=added)
        emb = emb + aug if aug is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        attend = {"encoder_hidden_states": text} if self.cross_attention else {}
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        hidden = unet.conv_in(sample)
        _, skips = self.first(hidden_states=hidden, temb=emb, **(attend if _attends(self.first) else {}))
        skips = (hidden, *skips)
        hidden = self.last(
            hidden_states=feature,
            temb=emb,
            res_hidden_states_tuple=skips[-len(self.last.resnets) :],
            **(attend if _attends(self.last) else {}),
        )
        if unet.conv_norm_out:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden)


def _attends(block: torch.nn.Module) -> bool:
    return getattr(block, "has_cross_attention", False)


class ControlNetExport(torch.nn.Module):
    """A ControlNet: the UNet's inputs, the control image and its scale -> the residuals, flat."""

    def __init__(self, controlnet: torch.nn.Module):
        super().__init__()
        self.controlnet = controlnet

    def forward(
        self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, controlnet_cond, conditioning_scale
    ):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        down, mid = self.controlnet(
            sample,
            timestep,
            encoder_hidden_states,
            controlnet_cond=controlnet_cond,
            conditioning_scale=conditioning_scale,
            added_cond_kwargs=added,
            return_dict=False,
        )
        return (*down, mid)


class VaeEncoderExport(torch.nn.Module):
    """Pixels in [-1, 1] -> latent distribution parameters (mean and log-variance, as optimum expects)."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        encoded = self.vae.encode(sample)
        if hasattr(encoded, "latents"):  # AutoencoderTiny: the latents themselves, as a distribution of no spread
            return torch.cat([encoded.latents, torch.full_like(encoded.latents, -30.0)], dim=1)
        return encoded.latent_dist.parameters


class VaeDecoderExport(torch.nn.Module):
    """Unscaled latents -> pixels in [-1, 1]."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


# the UNet graphs exported from the whole UNet, by submodel name (DeepCache's shallow one takes part of it)
UNET_EXPORTS = {"unet": UNetExport, "unet_controlnet": ControlledUNetExport, "unet_refresh": RefreshUNetExport}

SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def stored_dtype(component: Path) -> torch.dtype:
    """The floating-point dtype of the weights ``from_pretrained`` loads from a component folder (fp32 if unknown).

    Only the default files count: ``diffusion_pytorch_model.fp16.safetensors`` and other variants are not loaded.
    """
    from safetensors import safe_open

    for path in sorted(component.glob("*.safetensors")):
        if "." in path.stem:  # a variant file
            continue
        with safe_open(path, framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118 - safe_open is not a mapping
                dtype = SAFETENSORS_DTYPES.get(weights.get_slice(key).get_dtype())
                if dtype is not None:
                    return dtype
    return torch.float32


def load_submodel(name: str, model_path: str | Path) -> torch.nn.Module:
    """Load submodel ``name`` of the diffusers folder ``model_path`` as an export module in eval mode, in the dtype
    its weights are stored in."""
    root = Path(model_path)
    if name in ("text_encoder", "text_encoder_2"):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        with_projection = name == "text_encoder_2"
        cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
        encoder = cls.from_pretrained(root / name, dtype=stored_dtype(root / name), attn_implementation="eager")
        module: torch.nn.Module = TextEncoderExport(encoder, with_projection=with_projection)
    elif name in (*UNET_EXPORTS, "unet_shallow"):
        from diffusers import UNet2DConditionModel
        from diffusers.models.attention_processor import AttnProcessor

        unet = UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=stored_dtype(root / "unet"))
        unet.set_attn_processor(AttnProcessor())
        if name == "unet_shallow":  # the one that needs a fact of the model's configs
            module = ShallowUNetExport(unet, cross_attention=ModelSpec.from_folder(root).shallow_cross_attention)
        else:
            module = UNET_EXPORTS[name](unet)
    elif name == "controlnet":
        from diffusers import ControlNetModel
        from diffusers.models.attention_processor import AttnProcessor

        folder = root / "controlnet"
        controlnet = ControlNetModel.from_pretrained(folder, torch_dtype=stored_dtype(folder))
        controlnet.set_attn_processor(AttnProcessor())
        module = ControlNetExport(controlnet)
    elif name in ("vae_encoder", "vae_decoder"):
        import diffusers
        from diffusers.models.attention_processor import AttnProcessor

        kind = json.loads((root / "vae" / "config.json").read_text(encoding="utf-8")).get("_class_name")
        cls = diffusers.AutoencoderTiny if kind == "AutoencoderTiny" else diffusers.AutoencoderKL
        vae = cls.from_pretrained(root / "vae", torch_dtype=stored_dtype(root / "vae"))
        if cls is diffusers.AutoencoderKL:  # the tiny one has no attention
            vae.set_attn_processor(AttnProcessor())
        module = VaeEncoderExport(vae) if name == "vae_encoder" else VaeDecoderExport(vae)
    else:
        raise ValueError(f"unknown submodel {name!r}")
    return module.eval()


def dummy_inputs(name: str, model_path: str | Path, shape: Shape | None = None) -> tuple[torch.Tensor, ...]:
    """Export inputs for submodel ``name`` (a small shape by default: every dim is symbolic)."""
    spec = ModelSpec.from_folder(Path(model_path))
    return submodel_io(spec, name).dummy_inputs(shape or export_shape(spec))
