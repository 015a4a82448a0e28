"""Where the memory of a dropped CUDA session goes: back to CUDA, or kept by ONNX Runtime, and for what.

    python bench/experiments/arena_reuse.py

``--low_vram`` drops the text encoders' sessions once the prompt is encoded (sd_utils/generation.py). On the H100
(bench/NOTES.md, run 13) dropping them returned nothing to CUDA, yet the UNet's activations then ran in that memory.
Whether the next session's *weights* can reuse it decides whether loading the text encoders alone first, encoding and
dropping them before the UNet is loaded would lower the load peak. Here the same question on one-node models
(MatMul by a 1-GiB weight, or by 64 weights of 16 MiB), sessions made as the tool makes them (shared arena, its
session options), ``cudaMemGetInfo`` read after each step. Prints one JSON document.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_DIR))

GIB = 2**30


def _model(side: int, parts: int) -> bytes:
    """x (1, side) @ w_0 @ ... @ w_{parts-1}, each weight (side, side) fp32: ``parts * side**2 * 4`` bytes."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weights = [numpy_helper.from_array(np.full((side, side), 1 / side, np.float32), f"w{i}") for i in range(parts)]
    names = ["x", *(f"h{i}" for i in range(1, parts)), "y"]
    nodes = [helper.make_node("MatMul", [names[i], f"w{i}"], [names[i + 1]]) for i in range(parts)]
    value = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, side]) for name in ("x", "y")]
    graph = helper.make_graph(nodes, "weights", value[:1], value[1:], weights)
    return helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def main() -> int:
    import numpy as np
    import onnxruntime as ort
    import torch

    ort.preload_dlls()
    from sd_utils.runtime.providers import PROVIDERS, session_options, session_providers, share_arena

    cuda = PROVIDERS["cuda"]
    share_arena(cuda, 0)
    providers, provider_options = session_providers(cuda, 0)
    start = torch.cuda.mem_get_info()[0]

    def used() -> float:
        torch.cuda.synchronize()
        return round((start - torch.cuda.mem_get_info()[0]) / GIB, 3)

    def session(side: int, parts: int):
        made = ort.InferenceSession(
            _model(side, parts), session_options(cuda), providers=providers, provider_options=provider_options
        )
        made.run(None, {"x": np.ones((1, side), np.float32)})  # no NodeArg kept: it would keep the session alive
        return made

    report = {}
    one = session(16384, 1)  # 1 GiB of weights in one tensor
    report["one 1-GiB weight"] = used()
    del one
    gc.collect()
    report["after dropping it"] = used()
    again = session(16384, 1)
    report["a second 1-GiB weight"] = used()
    many = session(2048, 64)  # 64 weights of 16 MiB
    report["then 64 weights of 16 MiB"] = used()
    del again, many
    gc.collect()
    report["after dropping both"] = used()
    many = session(2048, 64)
    report["64 weights of 16 MiB again"] = used()
    del many
    print(json.dumps({"gib_in_use_after": report, "onnxruntime": ort.__version__}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
