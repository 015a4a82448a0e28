"""Print, as JSON, the fused (com.microsoft) operators and weight dtypes of every submodel of an ONNX pipeline folder.

python bench/experiments/fused_ops.py models/optimized/random-sdxl-base
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import onnx


def summarize(folder: Path) -> dict:
    summary = {}
    for model in sorted(folder.glob("*/model.onnx")):
        graph = onnx.load(str(model), load_external_data=False).graph
        summary[model.parent.name] = {
            "fused_ops": dict(collections.Counter(n.op_type for n in graph.node if n.domain == "com.microsoft")),
            "nodes": len(graph.node),
            "weight_dtypes": dict(
                collections.Counter(onnx.TensorProto.DataType.Name(t.data_type) for t in graph.initializer)
            ),
        }
    return summary


if __name__ == "__main__":
    print(json.dumps(summarize(Path(sys.argv[1])), indent=2))
