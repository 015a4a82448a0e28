"""ControlNet runs on ONNX Runtime: optimized ControlNets as the ``ControlNetModel`` diffusers' SDXL ControlNet
pipelines call, and the UNet session that takes their residuals.

diffusers' own ``StableDiffusionXLControlNet(Img2Img|Inpaint)Pipeline`` runs the loop (control images, several
ControlNets, ``control_guidance_start/end``), over the build's ONNX parts (``optimum_adapter.controlnet_pipeline``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sd_utils.sources.model_spec import ModelSpec, control_io_names

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


class SessionRunner:
    """Runs one ONNX Runtime session on torch tensors: each input cast to the graph's type, outputs as float32
    tensors on the inputs' device."""

    def __init__(self, session):
        self.session = session
        self.types = {item.name: _NUMPY_TYPES.get(item.type, np.float32) for item in session.get_inputs()}
        self.output_names = [item.name for item in session.get_outputs()]

    def __call__(self, feeds: dict[str, Any]) -> list[torch.Tensor]:
        device = next((value.device for value in feeds.values() if isinstance(value, torch.Tensor)), "cpu")
        arrays = {}
        for name, kind in self.types.items():
            value = feeds[name]
            value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            arrays[name] = value.astype(kind, copy=False)
        outputs = self.session.run(self.output_names, arrays)
        return [torch.from_numpy(np.asarray(output, dtype=np.float32)).to(device) for output in outputs]


class OrtControlNet(torch.nn.Module):
    """One optimized ControlNet with ``ControlNetModel.forward``'s signature (what ``MultiControlNetModel`` calls).

    A ``torch.nn.Module`` because ``MultiControlNetModel`` keeps its nets in a ``ModuleList``; its one buffer gives
    diffusers the device and dtype it asks a ControlNet for."""

    def __init__(self, run, folder: Path, *, device: str | torch.device = "cpu"):
        """``run(feeds)``: the ControlNet's session run on torch tensors (a :class:`SessionRunner`, or a CUDA-graph
        runner), returning the residuals in order."""
        from diffusers.configuration_utils import FrozenDict

        super().__init__()
        self.run = run
        self.folder = folder
        self.config = FrozenDict(json.loads((folder / "config.json").read_text(encoding="utf-8")))
        self.register_buffer("probe", torch.zeros((), device=device), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def forward(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        controlnet_cond,
        conditioning_scale: float = 1.0,
        class_labels=None,
        timestep_cond=None,
        attention_mask=None,
        added_cond_kwargs: dict | None = None,
        cross_attention_kwargs=None,
        guess_mode: bool = False,
        return_dict: bool = True,
    ):
        from diffusers.models.controlnets.controlnet import ControlNetOutput

        feeds = {
            "sample": sample,
            "timestep": timestep,
            "encoder_hidden_states": encoder_hidden_states,
            "controlnet_cond": controlnet_cond,
            "conditioning_scale": np.float32(conditioning_scale),
            **(added_cond_kwargs or {}),
        }
        *down, mid = self.run(feeds)
        if not return_dict:
            return tuple(down), mid
        return ControlNetOutput(down_block_res_samples=tuple(down), mid_block_res_sample=mid)


def residual_feeds(spec: ModelSpec, down: tuple | None, mid) -> dict[str, Any]:
    """The controlled UNet's residual inputs by name (zeros never reach it: a ControlNet run always has them)."""
    down_names, mid_name = control_io_names(spec)
    return {**dict(zip(down_names, down, strict=True)), mid_name: mid}
