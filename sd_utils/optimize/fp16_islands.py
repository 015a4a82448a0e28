"""fp16 conversion that streams each tensor, and the fp32 islands kept inside fp16 graphs (e.g. the SDXL VAE
decoder's last up-block, which overflows fp16)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import onnx

from sd_utils.optimize.external_data import ExternalDataWriter, ExternalTensors

# onnx.save_model's default: smaller tensors stay inside the .onnx file


def to_float16(array: np.ndarray, min_positive_val: float, max_finite_val: float, chunk: int = 1 << 20) -> np.ndarray:
    """``float16.convert_np_to_float16`` of ONNX Runtime, value for value: finite values beyond the fp16 range clamp to
    +-``max_finite_val``, non-zero ones closer to zero than ``min_positive_val`` become +-``min_positive_val``; zeros,
    infinities and NaNs stay. Written again because ONNX Runtime's makes a dozen full-size temporaries per tensor
    (``np.where`` over boolean masks), which took 170 of the 750 s of a full-size UNet's fp16 build (bench/NOTES.md);
    this works through the tensor a cache-sized chunk at a time."""
    tiny, large = np.float32(min_positive_val), np.float32(max_finite_val)
    flat = np.asarray(array, dtype=np.float32).reshape(-1)
    out = np.empty(flat.shape, dtype=np.float16)
    for start in range(0, flat.size, chunk):
        part = flat[start : start + chunk].copy()
        magnitude = np.abs(part)
        small = (magnitude > 0) & (magnitude < tiny)
        part[small] = np.copysign(tiny, part[small])
        big = (magnitude > large) & (magnitude < np.inf)
        part[big] = np.copysign(large, part[big])
        out[start : start + chunk] = part  # the same rounding as numpy's astype
    return out.reshape(np.shape(array))


@contextlib.contextmanager
def fp16_conversion_streams(read: ExternalTensors, writer: ExternalDataWriter) -> Iterator[None]:
    """ONNX Runtime's fp16 conversion retypes a tensor whose data is external without converting the data, and puts
    the fp16 bytes of the others into the protobuf. Instead, convert each external tensor as it comes: read its fp32
    bytes, write the fp16 ones to ``writer``'s file. What stays in memory is the graph."""
    float16 = transformers_module("float16")
    convert = float16.convert_tensor_float_to_float16

    def stream_convert(tensor, min_positive_val=5.96e-08, max_finite_val=65504.0):
        if tensor.data_type != onnx.TensorProto.FLOAT or tensor.data_location != onnx.TensorProto.EXTERNAL:
            return convert(tensor, min_positive_val, max_finite_val)
        # what convert() does to raw data (clamp to the fp16 range, keep tiny values from flushing to zero)
        array = np.frombuffer(read(tensor), dtype=np.float32).reshape(tuple(tensor.dims))
        array = to_float16(array, min_positive_val, max_finite_val)
        tensor.data_type = onnx.TensorProto.FLOAT16
        writer.place(tensor, array.tobytes())
        return tensor

    def value_info(tensor):  # float16.make_value_info_from_tensor reads the whole tensor for its shape
        return onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))

    make_value_info = float16.make_value_info_from_tensor
    float16.convert_tensor_float_to_float16 = stream_convert
    float16.make_value_info_from_tensor = value_info
    try:
        yield
    finally:
        float16.convert_tensor_float_to_float16 = convert
        float16.make_value_info_from_tensor = make_value_info


def island_inputs(graph: onnx.GraphProto, node_names: list[str]) -> list[str]:
    """The tensors where the fp32 islands that start at the nodes ``node_names`` of ``graph`` begin: each node's first
    input. Read before the fusions, which may replace the node itself (a Conv by Transpose + NhwcConv + Transpose) but
    keep reading that input."""
    nodes = {node.name: node for node in graph.node}
    missing = [name for name in node_names if name not in nodes]
    if missing:
        raise ValueError(
            f"force_fp32_from names {', '.join(repr(name) for name in missing)}, which is not a node of the model: "
            "use the node names of the exported (unoptimized) graph"
        )
    return [nodes[name].input[0] for name in node_names]


def _readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes of ``graph`` that read it."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def downstream_nodes(graph: onnx.GraphProto, tensors: list[str]) -> list[onnx.NodeProto]:
    """Every node of ``graph`` that reads one of ``tensors`` or, transitively, a tensor such a node makes."""
    readers = _readers(graph)
    found: dict[int, onnx.NodeProto] = {}
    frontier = list(tensors)
    while frontier:
        for node in readers.get(frontier.pop(), ()):
            if id(node) not in found:
                found[id(node)] = node
                frontier.extend(node.output)
    return list(found.values())


def fp32_island(graph: onnx.GraphProto, tensors: list[str]) -> list[str]:
    """Names of the nodes to keep in fp32 for islands beginning at ``tensors`` (see :func:`island_inputs`): the
    nodes downstream of them (unnamed ones get a name, since the fp16 conversion blocks nodes by name) and the
    output casts the fp16 conversion adds where an island reaches a graph output (``graph_output_cast<i>`` in ONNX
    Runtime's ``float16.py``), so an island's output goes out as it is computed."""
    island = downstream_nodes(graph, tensors)
    inside = {id(node) for node in island}
    readers = _readers(graph)

    def read_by_island_only(node) -> bool:
        return all(readers.get(name) and all(id(r) in inside for r in readers[name]) for name in node.output)

    # constants only the island reads (e.g. a decomposed GroupNorm's scale): fp32 too, not converted and cast back
    island += [
        node
        for node in graph.node
        if node.op_type == "Constant" and id(node) not in inside and read_by_island_only(node)
    ]
    for index, node in enumerate(node for node in island if not node.name):
        node.name = f"fp32_island_{index}"
    made = {name for node in island for name in node.output}
    casts = [f"graph_output_cast{i}" for i, output in enumerate(graph.output) if output.name in made]
    return [node.name for node in island] + casts


def close_fp16_round_trips(graph: onnx.GraphProto, island: list[str]) -> int:
    """Let the island's nodes read each other's results directly where the fp16 conversion left a round trip
    through fp16 between them (``Cast`` to fp16, then ``Cast`` back to fp32: what would overflow is cut there).

    ONNX Runtime's conversion puts such a pair on every tensor that joins two blocked nodes and has a type in the
    graph's value_info, and its clean-up of cascaded casts misses some (seen after the NhwcConv fusion's Transposes).
    Returns the number of round trips closed."""
    members = set(island)
    producer = {name: node for node in graph.node for name in node.output}
    readers = _readers(graph)
    outputs = {output.name for output in graph.output}

    def cast_to(node) -> int | None:
        if node is None or node.op_type != "Cast":
            return None
        return next(attribute.i for attribute in node.attribute if attribute.name == "to")

    closed = 0
    for node in list(graph.node):
        down = producer.get(node.input[0]) if node.op_type == "Cast" else None
        if cast_to(node) != onnx.TensorProto.FLOAT or cast_to(down) != onnx.TensorProto.FLOAT16:
            continue
        source = producer.get(down.input[0])
        if source is None or source.name not in members or node.output[0] in outputs:
            continue
        for reader in readers.get(node.output[0], []):
            reader.input[:] = [down.input[0] if name == node.output[0] else name for name in reader.input]
        closed += 1
    while True:  # the casts nothing reads any more
        used = {name for node in graph.node for name in node.input} | outputs
        unused = [node for node in graph.node if node.op_type == "Cast" and node.output[0] not in used]
        if not unused:
            break
        for node in unused:
            graph.node.remove(node)
    made = {name for node in graph.node for name in node.output}
    stale = [info for info in graph.value_info if info.name not in made]
    for info in stale:
        graph.value_info.remove(info)
    return closed


def transformers_module(name: str):
    """The module of ONNX Runtime's transformer optimizer that its fusions use. They import each other by top-level
    names (``from onnx_model import OnnxModel``: ``onnxruntime.transformers`` puts its folder on ``sys.path``), so
    ``onnx_model`` and ``onnxruntime.transformers.onnx_model`` are two module objects with two ``OnnxModel`` classes;
    patching the second changes nothing the optimizer runs."""
    import importlib

    import onnxruntime.transformers.optimizer  # noqa: F401 - puts the folder on sys.path

    return importlib.import_module(name)
