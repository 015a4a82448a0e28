"""The TorchScript exporter's constant folding, done on a graph whose weights are graph inputs read on demand."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from sd_utils.optimize.external_data import save_model

# onnx.save_model's default: smaller tensors stay inside the .onnx file

NONDETERMINISTIC_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial"}


def _evaluate(node: onnx.NodeProto, inputs: list[np.ndarray], opset: int) -> list[np.ndarray]:
    """Run one standard ONNX node with the reference implementation (folding needs correctness, not speed)."""
    from onnx.reference import ReferenceEvaluator

    names = [name for name in node.input if name]
    graph = onnx.helper.make_graph(
        [node],
        "fold",
        [
            onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
            for n, a in zip(names, inputs, strict=True)
        ],
        [onnx.helper.make_empty_tensor_value_info(out) for out in node.output],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    return ReferenceEvaluator(model).run(None, dict(zip(names, inputs, strict=True)))


def fold_and_attach(model: onnx.ModelProto, weights: dict[str, Callable[[], np.ndarray]], onnx_file: Path) -> None:
    """Turn the graph inputs named in ``weights`` into initializers and save ``model`` to ``onnx_file``.

    Does what the TorchScript exporter's constant folding does with ``export_params=True``: every standard node
    whose inputs are all weights or ``Constant`` outputs becomes an initializer (e.g. the transposed weight of each
    ``MatMul``). Values are computed lazily, one tensor at a time, while the data file is written.
    """
    graph = model.graph
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    values: dict[str, Callable[[], np.ndarray]] = dict(weights)
    constant_nodes = {}
    kept = []
    for node in graph.node:
        if node.op_type == "Constant" and not node.input:
            constant_nodes[node.output[0]] = node
            values[node.output[0]] = _constant_value(node, opset)
            kept.append(node)
        elif (
            node.domain in ("", "ai.onnx")
            and node.op_type not in NONDETERMINISTIC_OPS
            and all(name in values for name in node.input if name)
            and not any(a.type == onnx.AttributeProto.GRAPH for a in node.attribute)
        ):
            thunk = _fold(node, [values[n] for n in node.input if n], opset)
            for index, output in enumerate(node.output):
                values[output] = _output_of(thunk, index)
        else:
            kept.append(node)
    used = {name for node in kept for name in node.input} | {out.name for out in graph.output}
    # Constant nodes stay nodes (as the exporter leaves them) where something still reads them
    kept = [n for n in kept if n.op_type != "Constant" or n.output[0] in used]
    del graph.node[:]
    graph.node.extend(kept)
    weight_inputs = [i for i in graph.input if i.name in weights]
    for graph_input in weight_inputs:
        graph.input.remove(graph_input)
    names = [name for name in values if name in used and name not in constant_nodes]
    graph.initializer.extend(onnx.TensorProto(name=name) for name in names)

    def tensor_bytes(tensor: onnx.TensorProto) -> bytes:
        array = np.ascontiguousarray(values[tensor.name]())
        tensor.dims.extend(array.shape)
        tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        return array.tobytes()

    save_model(model, onnx_file, tensor_bytes)


def _constant_value(node: onnx.NodeProto, opset: int) -> Callable[[], np.ndarray]:
    def value() -> np.ndarray:
        return _evaluate(node, [], opset)[0]

    return value


def _fold(node, inputs: list[Callable[[], np.ndarray]], opset: int) -> Callable[[], list[np.ndarray]]:
    def outputs() -> list[np.ndarray]:
        return _evaluate(node, [value() for value in inputs], opset)

    return outputs


def _output_of(thunk: Callable[[], list[np.ndarray]], index: int) -> Callable[[], np.ndarray]:
    def value() -> np.ndarray:
        return np.asarray(thunk()[index])

    return value
