"""Olive passes that never hold a model's weights in memory twice: SDXL's UNet optimizes on a 16-GB machine.

Olive's stock ``OnnxConversion`` keeps the PyTorch weights, the exporter's protobuf copy of them and the reloaded
ONNX model alive at once, and ``OrtTransformersOptimization`` loads every tensor before symbolic shape inference
copies the model again: more than 70 GB for the full-size SDXL UNet. The two subclasses here do the same work with
the weights kept out of the graph:

* :class:`StreamingOnnxConversion` traces the module with zero-stride stand-ins for its parameters (one element of
  memory each, exported as graph inputs), then does the exporter's constant folding itself and writes the real
  tensors, one at a time, to the external data file. The module stays in the dtype it is stored in (fp16 for
  SDXL) and each tensor is cast to ``torch_dtype`` (fp32) only while it is written.
* :class:`StreamingTransformersOptimization` runs ONNX Runtime's transformer optimizer on the graph loaded without
  its external data: the fusions read the tensors they repack from the file on demand and their results (packed
  QKV/KV, NHWC conv weights) go to a spill file as they are made; the fp16 conversion reads each fp32 tensor and
  writes its fp16 bytes there too. Symbolic shape inference, which copies the whole model before and after the
  fp16 conversion, then copies a graph without weights.

Both take the options of the pass they extend, so a config switches between stock and streaming by ``type`` alone
(``tests/test_streaming_passes.py`` checks that both give the same fused graph and the same outputs).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from olive.common.utils import exclude_keys, resolve_torch_dtype
from olive.model import ONNXModelHandler
from olive.model.utils import resolve_onnx_path
from olive.passes.onnx.common import get_external_data_config
from olive.passes.onnx.conversion import OnnxConversion, _get_dummy_inputs
from olive.passes.onnx.transformer_optimization import OrtTransformersOptimization
from olive.passes.pass_config import PassConfigParam
from onnx import numpy_helper

# onnx.save_model's default: smaller tensors stay inside the .onnx file
SIZE_THRESHOLD = 1024
# not folded even when all inputs are constant
NONDETERMINISTIC_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial"}


def package_config() -> dict[str, Any]:
    """Olive's package config (its table of pass types) with the streaming passes added."""
    from olive.package_config import OlivePackageConfig

    config = json.loads(Path(OlivePackageConfig.get_default_config_path()).read_text(encoding="utf-8"))
    for cls, base in (
        (StreamingOnnxConversion, "OnnxConversion"),
        (StreamingTransformersOptimization, "OrtTransformersOptimization"),
    ):
        config["passes"][cls.__name__] = {**config["passes"][base], "module_path": f"{__name__}.{cls.__name__}"}
    return config


# ---------------------------------------------------------------------------------------------------- writing


class _ExternalDataWriter:
    """Appends tensor bytes to one external data file and points each tensor at its bytes."""

    def __init__(self, onnx_file: Path):
        self.name = onnx_file.name + ".data"
        self._file = open(onnx_file.parent / self.name, "wb")  # noqa: SIM115 - closed by close()

    def place(self, tensor: onnx.TensorProto, data: bytes) -> None:
        # the bytes never go into the protobuf: upb allocates fields in the message's arena and frees nothing before
        # the message, so setting and clearing raw_data per tensor would keep the whole model in memory anyway
        del tensor.external_data[:]
        if len(data) < SIZE_THRESHOLD:
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = data
            return
        offset = self._file.tell()
        self._file.write(data)
        self._file.flush()  # readable at once through other handles (onnx's, _ExternalTensors')
        for key, value in (("location", self.name), ("offset", str(offset)), ("length", str(len(data)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensor.data_location = onnx.TensorProto.EXTERNAL
        tensor.ClearField("raw_data")

    def close(self) -> None:
        self._file.close()


def _save(model: onnx.ModelProto, onnx_file: Path, tensor_bytes: Callable[[onnx.TensorProto], bytes | None]) -> None:
    """Save ``model`` with every initializer's bytes (from ``tensor_bytes``, or the tensor itself when that returns
    None) in ``<onnx_file>.data``; the graph itself stays small, so the protobuf 2-GB limit never applies."""
    onnx_file.parent.mkdir(parents=True, exist_ok=True)
    writer = _ExternalDataWriter(onnx_file)
    try:
        for tensor in model.graph.initializer:
            data = tensor_bytes(tensor)
            if data is None:
                if tensor.HasField("raw_data"):
                    data = tensor.raw_data
                else:  # typed fields (float_data, int64_data, ...): small, written by the fusions
                    data = numpy_helper.to_array(tensor).tobytes()
                    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                        tensor.ClearField(field)
            writer.place(tensor, data)
    finally:
        writer.close()
    onnx.save_model(model, str(onnx_file))


# ---------------------------------------------------------------------------------------------------- conversion


@contextlib.contextmanager
def _stand_in_parameters(module, dtype) -> Iterator[None]:
    """Swap every parameter of ``module`` for a zero-stride tensor of its shape in ``dtype`` (one element of memory;
    tracing records operations, not values); put the real ones back after."""
    import torch

    swapped = []
    for _, owner in module.named_modules():
        for name, parameter in list(owner._parameters.items()):
            if parameter is None:
                continue
            swapped.append((owner, name, parameter))
            # distinct values: the exporter merges initializers that are equal into one (Identity nodes)
            stand_in = torch.full((), float(len(swapped)), dtype=dtype).expand(parameter.shape)
            owner._parameters[name] = torch.nn.Parameter(stand_in, requires_grad=False)
    try:
        yield
    finally:
        for owner, name, parameter in swapped:
            owner._parameters[name] = parameter


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

    _save(model, onnx_file, tensor_bytes)


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


class StreamingOnnxConversion(OnnxConversion):
    """``OnnxConversion`` (TorchScript exporter) with weights streamed to disk instead of held in the protobuf."""

    def _convert_model_on_device(self, model, config, output_model_path, device, torch_dtype=None):
        import tempfile

        import torch

        if config.use_dynamo_exporter:
            raise ValueError(
                "StreamingOnnxConversion exports with the TorchScript exporter: set use_dynamo_exporter "
                "to false, or use OnnxConversion"
            )
        dtype = torch_dtype or resolve_torch_dtype("float32")
        module = model.load_model(cache_model=False).eval()
        io_config = model.io_config
        dummy_inputs = _get_dummy_inputs(model, config)
        onnx_file = Path(resolve_onnx_path(output_model_path))
        # parameters and persistent buffers by the names the exporter gives their graph inputs (references)
        tensors = module.state_dict()
        with _stand_in_parameters(module, dtype), tempfile.TemporaryDirectory() as tmp:
            graph_file = Path(tmp) / "graph.onnx"
            torch.onnx.export(
                module,
                dummy_inputs,
                str(graph_file),
                export_params=False,
                do_constant_folding=False,
                opset_version=config.target_opset,
                input_names=io_config["input_names"],
                output_names=io_config["output_names"],
                dynamic_axes=io_config.get("dynamic_axes") if config.dynamic else None,
                dynamo=False,
            )
            graph = onnx.load(str(graph_file))

        def weight(name: str) -> Callable[[], np.ndarray]:
            def value() -> np.ndarray:
                tensor = tensors[name].detach()
                return (tensor.to(dtype) if tensor.is_floating_point() else tensor).numpy()

            return value

        input_names = {i.name for i in graph.graph.input}
        fold_and_attach(graph, {name: weight(name) for name in tensors if name in input_names}, onnx_file)
        return ONNXModelHandler(
            model_path=str(onnx_file.parent), onnx_file_name=onnx_file.name, model_attributes=model.model_attributes
        )


# ---------------------------------------------------------------------------------------------------- optimization


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    # onnx resolves external data against the current directory when no base directory is given, which is how
    # ONNX Runtime's fusions read the weights they repack
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


class _ExternalTensors:
    """Reads the bytes of a model's external tensors (locations relative to ``folder``)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._files: dict[str, Any] = {}

    def __call__(self, tensor: onnx.TensorProto) -> bytes | None:
        if tensor.data_location != onnx.TensorProto.EXTERNAL or tensor.HasField("raw_data"):
            return None
        info = onnx.external_data_helper.ExternalDataInfo(tensor)
        handle = self._files.get(info.location)
        if handle is None:
            handle = self._files[info.location] = open(self.folder / info.location, "rb")  # noqa: SIM115
        handle.seek(info.offset or 0)
        return handle.read(info.length) if info.length else handle.read()

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()


def _transformers_module(name: str):
    """The module of ONNX Runtime's transformer optimizer that its fusions use. They import each other by top-level
    names (``from onnx_model import OnnxModel``: ``onnxruntime.transformers`` puts its folder on ``sys.path``), so
    ``onnx_model`` and ``onnxruntime.transformers.onnx_model`` are two module objects with two ``OnnxModel`` classes;
    patching the second changes nothing the optimizer runs."""
    import importlib

    import onnxruntime.transformers.optimizer  # noqa: F401 - puts the folder on sys.path

    return importlib.import_module(name)


@contextlib.contextmanager
def _fusions_write_to(spill: _ExternalDataWriter) -> Iterator[None]:
    """Every large tensor a fusion makes (packed QKV/KV weights, NHWC conv weights, ...) goes to ``spill``'s file
    before it joins the graph: it never enters the protobuf, and the copies of the model that symbolic shape
    inference makes stay small. A later fusion that reads it back finds it through the current directory."""
    OnnxModel = _transformers_module("onnx_model").OnnxModel  # noqa: N806 - a class

    add_initializer = OnnxModel.add_initializer

    def add_spilled(self, tensor, graph_name=None):
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= SIZE_THRESHOLD:
            spill.place(tensor, tensor.raw_data)
        return add_initializer(self, tensor, graph_name)

    OnnxModel.add_initializer = add_spilled
    try:
        yield
    finally:
        OnnxModel.add_initializer = add_initializer


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
def _fp16_conversion_streams(read: _ExternalTensors, writer: _ExternalDataWriter) -> Iterator[None]:
    """ONNX Runtime's fp16 conversion retypes a tensor whose data is external without converting the data, and puts
    the fp16 bytes of the others into the protobuf. Instead, convert each external tensor as it comes: read its fp32
    bytes, write the fp16 ones to ``writer``'s file. What stays in memory is the graph."""
    float16 = _transformers_module("float16")
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


class StreamingTransformersOptimization(OrtTransformersOptimization):
    """``OrtTransformersOptimization`` run on the graph without its weights (SDXL's clip, unet and vae types).

    One option more than the stock pass: ``force_fp32_from``, node names of the exported graph from which on the
    model stays fp32 when ``float16`` is on, i.e. each named node (or what a fusion replaced it with) and every node
    that depends on its result. SDXL's VAE decoder overflows fp16 in its last up-block; ``force_fp32_nodes`` cannot
    name that region, because the fusions inside it (GroupNorm, NhwcConv) get their node names only when they run.
    """

    @classmethod
    def _default_config(cls, accelerator_spec) -> dict[str, PassConfigParam]:
        config = super()._default_config(accelerator_spec)
        config["force_fp32_from"] = PassConfigParam(
            type_=list[str],
            default_value=None,
            description=(
                "Nodes of the input model (by name) from which on the model runs in float32: fp32 islands where "
                "float16 overflows. Only used when float16 is True."
            ),
        )
        return config

    def _run_for_config(self, model, config, output_model_path):
        from onnxruntime.transformers import optimizer as transformers_optimizer

        unsupported = [key for key in ("use_gqa", "input_int32") if getattr(config, key)]
        if unsupported:
            raise ValueError(
                f"StreamingTransformersOptimization does not support {', '.join(unsupported)}: use "
                "OrtTransformersOptimization"
            )
        run_config = exclude_keys(
            config.model_dump(),
            [
                "float16",
                "keep_io_types",
                "force_fp32_ops",
                "force_fp32_nodes",
                "force_fp16_inputs",
                "force_fp32_from",
                "use_gqa",
                "input_int32",
                "num_key_value_heads",
                *get_external_data_config(),
            ],
        )
        if config.optimization_options:
            self._set_fusion_options(run_config)
        source = Path(model.model_path)
        output = Path(resolve_onnx_path(output_model_path, source.name))
        graph = onnx.load(str(source), load_external_data=False)
        island_starts = island_inputs(graph.graph, config.force_fp32_from or []) if config.float16 else []
        # what the fusions and the fp16 conversion make is spilled beside the input's data, where onnx (which resolves
        # external data against the current directory, and refuses links) can read it back; deleted at the end
        spill = _ExternalDataWriter(source.parent / f".spill-{uuid.uuid4().hex}")
        read = _ExternalTensors(source.parent)
        try:
            with _working_directory(source.parent), _fusions_write_to(spill):
                optimizer = transformers_optimizer.optimize_model(graph, **run_config)
                if config.float16:
                    island = fp32_island(optimizer.model.graph, island_starts)
                    with _fp16_conversion_streams(read, spill):
                        optimizer.convert_float_to_float16(
                            keep_io_types=config.keep_io_types,
                            op_block_list=config.force_fp32_ops,
                            node_block_list=[*(config.force_fp32_nodes or []), *island],
                            force_fp16_inputs=config.force_fp16_inputs,
                        )
                    if island:
                        close_fp16_round_trips(optimizer.model.graph, island)
                optimizer.topological_sort()
            spill.close()
            _save(optimizer.model, output, read)
        finally:
            read.close()
            spill.close()
            (source.parent / spill.name).unlink(missing_ok=True)
        return ONNXModelHandler(model_path=str(output.parent), onnx_file_name=output.name)
