"""The streaming Olive passes (sd_utils/optimize/olive_passes.py) against Olive's stock passes on the tiny model.

Same workflow configs, only the pass ``type`` swapped: the optimized graphs must have the same fused operators, carry
the same tensors (bit for bit) and, on CPU, compute the same outputs.
"""

from __future__ import annotations

import collections
import hashlib
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from sd_utils.optimize.export_models import stored_dtype
from sd_utils.optimize.olive_workflow import (
    external_data_files,
    load_template,
    run_submodel,
    unsupported_fusions,
    workflow_config,
)
from sd_utils.runtime.providers import PROVIDERS
from sd_utils.sources.model_spec import SUBMODELS, export_shape, submodel_io

STOCK_TYPES = {
    "StreamingOnnxConversion": "OnnxConversion",
    "StreamingTransformersOptimization": "OrtTransformersOptimization",
}
# fp16 graphs are compared by their contents only: their fused kernels (GroupNorm, NhwcConv, ...) have no CPU kernels
# (the VAE decoder's fp32 island is an option of the streaming pass only: checked below). Each provider's fp16 path
# once: the UNet with CUDA's fusions (the most of them), a text encoder with DirectML's (the DirectML UNet's fusions
# are checked in its build, tests/test_gpu_graphs.py)
FP16_CASES = [("unet", "cuda"), ("text_encoder", "dml"), ("text_encoder_2", "cuda")]


@pytest.fixture(scope="module")
def optimize(tiny_spec, tmp_path_factory):
    """optimize(submodel, provider, stock) -> the optimized ONNX file; one Olive cache per kind of pass."""
    root = tmp_path_factory.mktemp("streaming")
    done = {}

    def run(submodel: str, provider: str, stock: bool, *, converted: bool = False) -> Path:
        key = (submodel, provider, stock)
        if key not in done:
            row = PROVIDERS[provider]
            kind = "stock" if stock else "streaming"
            config = workflow_config(
                load_template(submodel),
                submodel=submodel,
                provider=row,
                model_path=tiny_spec.root,
                disabled_fusions=unsupported_fusions(tiny_spec, provider=row, submodel=submodel),
                cache_dir=root / kind / "cache",
                output_dir=root / kind / f"{submodel}-{provider}",
            )
            if stock:
                for options in config["passes"].values():
                    options["type"] = STOCK_TYPES[options["type"]]
            before = tempfile.tempdir
            done[key] = run_submodel(config, submodel=submodel, tempdir=root / "tmp")
            assert tempfile.tempdir == before  # a later build of the process must not use this run's folder
        return done[key][0 if converted else 1]

    return run


def _ops(model: onnx.ModelProto) -> collections.Counter:
    # the streaming export folds a few more constant-only nodes (e.g. shape arithmetic) than the exporter does
    return collections.Counter(n.op_type for n in model.graph.node if n.op_type not in ("Constant", "Cast"))


def _fused(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node if n.domain == "com.microsoft")


def _tensors(model: onnx.ModelProto) -> collections.Counter:
    """The initializers as (dtype, shape, digest): names of folded tensors differ between the exporters."""
    arrays = (numpy_helper.to_array(t) for t in model.graph.initializer)
    return collections.Counter((a.dtype.str, a.shape, hashlib.sha1(a.tobytes()).hexdigest()) for a in arrays)


def _feeds(session, spec, submodel: str) -> dict[str, np.ndarray]:
    inputs = submodel_io(spec, submodel).dummy_inputs(export_shape(spec))
    return {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}


@pytest.mark.parametrize("submodel", SUBMODELS)
def test_cpu_graph_and_outputs_match_the_stock_passes(optimize, tiny_spec, submodel):
    import onnxruntime as ort

    stock_file, streaming_file = optimize(submodel, "cpu", True), optimize(submodel, "cpu", False)
    stock, streaming = onnx.load(str(stock_file)), onnx.load(str(streaming_file))
    assert _fused(streaming) == _fused(stock)
    if not submodel.startswith("vae"):  # the VAE keeps its attention unfused (ORT 1.32 bug) and has no CPU fusion
        assert sum(_fused(stock).values()) > 0, "the optimizer fused nothing"
    assert _ops(streaming) <= _ops(stock)
    assert not _tensors(stock) - _tensors(streaming), "a tensor of the stock graph is missing or different"
    sessions = [ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]) for f in (stock_file, streaming_file)]
    feeds = _feeds(sessions[0], tiny_spec, submodel)
    for expected, actual in zip(*(s.run(None, feeds) for s in sessions), strict=True):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("submodel", "provider"), FP16_CASES)
def test_fp16_graph_matches_the_stock_passes(optimize, submodel, provider):
    stock, streaming = (onnx.load(str(optimize(submodel, provider, stock))) for stock in (True, False))
    assert _fused(streaming) == _fused(stock)
    assert not _tensors(stock) - _tensors(streaming), "a tensor of the stock graph is missing or different"
    fp16 = [t for t in streaming.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert fp16, "the fp16 conversion converted nothing"
    # inputs and outputs stay fp32 (keep_io_types), like the stock pass's
    assert [(i.name, i.type.tensor_type.elem_type) for i in streaming.graph.input] == [
        (i.name, i.type.tensor_type.elem_type) for i in stock.graph.input
    ]


def test_large_tensors_live_in_one_external_file(optimize):
    model_file = optimize("unet", "cpu", False)
    graph = onnx.load(str(model_file), load_external_data=False).graph
    locations = {entry.value for t in graph.initializer for entry in t.external_data if entry.key == "location"}
    assert locations == {model_file.name + ".data"}
    assert model_file.stat().st_size < 2**20, "the weights must not be inside the protobuf"


def test_submodels_load_in_their_stored_dtype(tiny_spec, tmp_path):
    """The conversion holds the module in its stored dtype (fp16 halves the UNet's 10 GB) and casts per tensor."""
    from diffusers import UNet2DConditionModel

    assert stored_dtype(tiny_spec.root / "unet") == torch.float32
    UNet2DConditionModel.from_pretrained(tiny_spec.root / "unet").to(torch.float16).save_pretrained(tmp_path / "unet")
    assert stored_dtype(tmp_path / "unet") == torch.float16
    assert stored_dtype(tmp_path / "nothing-here") == torch.float32


def test_tensors_a_fusion_makes_go_to_the_spill_file(tmp_path, monkeypatch):
    """What a fusion adds never enters the protobuf, and a later fusion reads it back through the current directory."""
    from sd_utils.optimize.external_data import ExternalDataWriter
    from sd_utils.optimize.fp16_islands import transformers_module
    from sd_utils.optimize.olive_passes import fusions_write_to

    OnnxModel = transformers_module("onnx_model").OnnxModel  # noqa: N806 - the class the fusions extend
    assert issubclass(transformers_module("onnx_model_unet").UnetOnnxModel, OnnxModel)

    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    packed = np.arange(4096, dtype=np.float32).reshape(64, 64)
    small = np.ones(4, dtype=np.float32)
    spill = ExternalDataWriter(tmp_path / ".spill-test")
    monkeypatch.chdir(tmp_path)
    with fusions_write_to(spill):
        OnnxModel(model).add_initializer(numpy_helper.from_array(packed, "packed_qkv"))
        OnnxModel(model).add_initializer(numpy_helper.from_array(small, "bias"))
    spill.close()
    stored, kept = model.graph.initializer
    assert stored.data_location == onnx.TensorProto.EXTERNAL and not stored.HasField("raw_data")
    assert kept.data_location == onnx.TensorProto.DEFAULT  # small tensors stay inline, as onnx.save_model keeps them
    np.testing.assert_array_equal(numpy_helper.to_array(stored), packed)
    assert OnnxModel.add_initializer.__name__ == "add_initializer"  # the patch is gone


def test_no_fused_weight_stays_in_the_protobuf(optimize, tmp_path):
    """The whole CUDA fusion set on the tiny UNet, spilling every tensor it makes: afterwards none of the float tensors
    the fusions added holds its bytes in memory (packed QKV/KV, NHWC conv, GroupNorm gamma/beta all went to disk)."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    from sd_utils.optimize import external_data, olive_passes

    source = optimize("unet", "cpu", False, converted=True)
    exported = tmp_path / "model.onnx"
    for name in (source.name, *external_data_files(source)):
        shutil.copy2(source.parent / name, tmp_path / name)
    options = FusionOptions("unet")
    cuda = load_template("unet")["passes"]["optimize_cuda"]["optimization_options"]
    for name, value in cuda.items():
        setattr(options, name, value)
    graph = onnx.load(str(exported), load_external_data=False)
    exported_names = {tensor.name for tensor in graph.graph.initializer}
    spill = external_data.ExternalDataWriter(exported.parent / ".spill", threshold=1)
    with external_data.working_directory(exported.parent), olive_passes.fusions_write_to(spill):
        fused = optimizer.optimize_model(
            graph, model_type="unet", opt_level=0, use_gpu=True, optimization_options=options
        )
    spill.close()
    assert {"NhwcConv", "MultiHeadAttention", "GroupNorm"} <= {node.op_type for node in fused.model.graph.node}
    made = [tensor for tensor in fused.model.graph.initializer if tensor.name not in exported_names]
    assert sum(np.prod(tensor.dims) for tensor in made) > 100_000  # packed QKV/KV, NHWC conv weights, ...
    inline = [
        tensor.name
        for tensor in made
        if tensor.data_type == onnx.TensorProto.FLOAT and (tensor.raw_data or tensor.float_data)
    ]
    assert inline == []


def test_fp16_conversion_of_a_tensor_matches_onnxruntimes():
    """The chunked fp16 conversion of external tensors gives ONNX Runtime's values bit for bit: clamped range, tiny
    values kept off zero, zeros, infinities and NaNs unchanged; across chunk boundaries too."""
    from onnxruntime.transformers.float16 import convert_np_to_float16

    from sd_utils.optimize.fp16_islands import to_float16

    edges = [0.0, -0.0, 1e-9, -1e-9, 3e-8, 5.96e-08, -5.96e-08, 1e-7, 6.1e-5, 1.0, -2.5, 65504.0, 65519.0, -7e4, 1e30]
    edges += [np.inf, -np.inf, np.nan]
    values = np.concatenate(
        [np.array(edges, dtype=np.float32), np.random.default_rng(0).standard_normal(5008).astype(np.float32) * 1e4]
    ).reshape(-1, 7)
    ours = to_float16(values, 5.96e-08, 65504.0, chunk=1000)
    assert ours.shape == values.shape
    assert np.array_equal(ours.view(np.uint16), convert_np_to_float16(values).view(np.uint16))


ISLAND_START = "/decoder/up_blocks.2/upsamplers.0/Resize_output_0"  # what the island's first node reads


@pytest.mark.parametrize("provider", ["dml", "cuda"])
def test_vae_decoder_island_stays_fp32_through_the_fusions(optimize, provider):
    """From the last upsampler on, the decoder is fp32: its weights, and no tensor passes through fp16 on the way, also
    after the CUDA fusions put NHWC Transposes between the nodes (ONNX Runtime's conversion left fp32 -> fp16 -> fp32
    casts there)."""
    from sd_utils.optimize.fp16_islands import downstream_nodes

    graph = onnx.load(str(optimize("vae_decoder", provider, False)), load_external_data=False).graph
    weights = {tensor.name: tensor.data_type for tensor in graph.initializer}
    island = downstream_nodes(graph, [ISLAND_START])
    assert {"Conv", "NhwcConv"} & {node.op_type for node in island}
    island_types = {weights[name] for node in island for name in node.input if name in weights}
    assert onnx.TensorProto.FLOAT16 not in island_types
    assert onnx.TensorProto.FLOAT16 in {weights[name] for node in graph.node for name in node.input if name in weights}
    casts = [(node.input[0], node.attribute[0].i) for node in island if node.op_type == "Cast"]
    assert casts == [(ISLAND_START, onnx.TensorProto.FLOAT)]
    assert [value.type.tensor_type.elem_type for value in graph.output] == [onnx.TensorProto.FLOAT]


def test_fp32_island_needs_a_node_of_the_model():
    from sd_utils.optimize.fp16_islands import island_inputs

    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"], name="relu")], "g", [], [])
    assert island_inputs(graph, ["relu"]) == ["x"]
    with pytest.raises(ValueError, match=r"force_fp32_from names '/decoder/conv_out/Conv', which is not a node"):
        island_inputs(graph, ["/decoder/conv_out/Conv"])


def test_round_trips_through_fp16_inside_an_island_are_closed():
    """a -> Cast(fp16) -> Cast(fp32) -> b, both island nodes: b reads a's fp32 result; a Cast from outside stays."""
    from sd_utils.optimize.fp16_islands import close_fp16_round_trips, fp32_island

    make = onnx.helper.make_node
    nodes = [
        make("Cast", ["x16"], ["x"], to=onnx.TensorProto.FLOAT, name="into"),
        make("Relu", ["x"], ["a"], name="a"),
        make("Constant", [], ["k"], value=numpy_helper.from_array(np.ones(1, np.float32)), name=""),
        make("Cast", ["a"], ["a16"], to=onnx.TensorProto.FLOAT16, name="down"),
        make("Cast", ["a16"], ["a32"], to=onnx.TensorProto.FLOAT, name="up"),
        make("Mul", ["a32", "k"], ["y"], name="b"),
    ]
    graph = onnx.helper.make_graph(
        nodes, "g", [], [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]
    )
    island = fp32_island(graph, ["x"])
    assert set(island) == {"a", "down", "up", "b", "fp32_island_0", "graph_output_cast0"}
    assert close_fp16_round_trips(graph, island) == 1
    assert [(node.name, list(node.input)) for node in graph.node if node.op_type != "Constant"] == [
        ("into", ["x16"]),
        ("a", ["x"]),
        ("b", ["a", "k"]),
    ]
