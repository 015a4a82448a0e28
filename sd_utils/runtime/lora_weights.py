"""Run-time LoRAs: a build's weights changed by LoRAs when its sessions are made, the model files untouched.

Each LoRA layer's weight change (``sources/lora.py``) is added where the build's weight map
(``optimize/weight_map.py``) says the weight lives in the optimized graph (packed, transposed, fp16 or not); the
changed initializers reach ONNX Runtime in a model file next to the build (``weight_overrides.py``). The graph is the
plain build's, so a step costs what it costs without a LoRA.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sd_utils.errors import ModelNotFoundError
from sd_utils.optimize.weight_map import as_graph_dtype, graph_initializers, layout_view, read_weight_map
from sd_utils.sources.lora import LoraFile, lora_layers
from sd_utils.sources.model_spec import COMPONENT_OF


def touches(lora: LoraFile, submodel: str) -> bool:
    return COMPONENT_OF.get(submodel) in lora.targets


def lora_initializers(
    folder: Path,
    submodel: str,
    loras: Sequence[LoraFile],
    *,
    config_root: Path | None = None,
    partial: bool = False,
) -> dict[str, np.ndarray]:
    """The initializers of build ``folder``'s ``submodel`` graph that ``loras`` (at their scales) change, with
    their new values in the graph's dtype; {} when none of them touches the submodel. ``config_root``: the model
    folder whose configs place the LoRAs' layers (default: the build's own copies). ``partial``: the graph holds
    only some of its component's layers (DeepCache's shallow UNet), so a layer it lacks is skipped, not refused."""
    component = COMPONENT_OF[submodel]
    loras = [lora for lora in loras if touches(lora, submodel)]
    if not loras:
        return {}
    places = read_weight_map(folder / submodel)
    if places is None:
        raise ModelNotFoundError(
            f"{folder} was built before run-time LoRAs (it has no {submodel}/weight_map.json): rebuild it with "
            "--optimize, or bake the LoRAs into a build of their own with --fuse_loras"
        )
    changes: dict[str, np.ndarray] = {}
    for lora in loras:
        for weight, delta in lora_layers(config_root or folder, lora).deltas(component):
            if weight not in places:
                if partial:
                    continue
                raise ModelNotFoundError(
                    f"--lora {lora.path.name} changes {component} layer {weight.removesuffix('.weight')}, which the "
                    "optimized graph does not hold as a weight (a fusion folded it into another); bake this LoRA "
                    "into a build with --fuse_loras"
                )
            change = delta * np.float32(lora.scale)
            changes[weight] = changes[weight] + change if weight in changes else change
    wanted = {place[0] for weight in changes for place in places[weight]}
    merged = {
        name: (values.astype(np.float32), values.dtype)
        for name, values in graph_initializers(folder / submodel / "model.onnx", wanted)
    }
    for weight, change in changes.items():
        rows = change.reshape(change.shape[0], -1)
        for tensor, layout, spans in places[weight]:
            target = layout_view(merged[tensor][0], layout)
            for first, row, count in spans:
                target[first : first + count] += rows[row : row + count].reshape((count, *target.shape[1:]))
    return {name: as_graph_dtype(values, dtype) for name, (values, dtype) in merged.items()}
