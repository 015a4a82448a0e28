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
import functools
import hashlib
import json
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

from sd_utils.optimize.constant_folding import fold_and_attach
from sd_utils.optimize.external_data import (
    ExternalDataWriter,
    ExternalTensors,
    save_model,
    working_directory,
)
from sd_utils.optimize.fp16_islands import (
    close_fp16_round_trips,
    fp16_conversion_streams,
    fp32_island,
    island_inputs,
    transformers_module,
)


# onnx.save_model's default: smaller tensors stay inside the .onnx file
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


PROJECT_DIR = Path(__file__).resolve().parents[2]


@functools.cache
def code_digest(project_dir: Path = PROJECT_DIR) -> str:
    """A digest of the Python sources that load, export and optimize models (``user_script.py`` and ``sd_utils``):
    part of Olive's cache key, so an upgraded sdxl-olive never reuses what older code exported."""
    digest = hashlib.sha256()
    for path in sorted([project_dir / "user_script.py", *(project_dir / "sd_utils").rglob("*.py")]):
        digest.update(path.relative_to(project_dir).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


class StreamingOnnxConversion(OnnxConversion):
    """``OnnxConversion`` (TorchScript exporter) with weights streamed to disk instead of held in the protobuf.

    One option more than the stock pass: ``code_digest`` (default: this checkout's), which only enters the pass's
    cache key."""

    @classmethod
    def _default_config(cls, accelerator_spec) -> dict[str, PassConfigParam]:
        config = super()._default_config(accelerator_spec)
        config["code_digest"] = PassConfigParam(
            type_=str,
            default_value=code_digest(),
            description="Digest of the code that loads and exports the model: a new version misses Olive's cache.",
        )
        return config

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


@contextlib.contextmanager
def fusions_write_to(spill: ExternalDataWriter) -> Iterator[None]:
    """Every large tensor a fusion makes (packed QKV/KV weights, NHWC conv weights, ...) goes to ``spill``'s file
    before it joins the graph: it never enters the protobuf, and the copies of the model that symbolic shape
    inference makes stay small. A later fusion that reads it back finds it through the current directory."""
    OnnxModel = transformers_module("onnx_model").OnnxModel  # noqa: N806 - a class

    add_initializer = OnnxModel.add_initializer

    def add_spilled(self, tensor, graph_name=None):
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= spill.threshold:
            spill.place(tensor, tensor.raw_data)
        return add_initializer(self, tensor, graph_name)

    OnnxModel.add_initializer = add_spilled
    try:
        yield
    finally:
        OnnxModel.add_initializer = add_initializer


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
        spill = ExternalDataWriter(source.parent / f".spill-{uuid.uuid4().hex}")
        read = ExternalTensors(source.parent)
        try:
            with working_directory(source.parent), fusions_write_to(spill):
                optimizer = transformers_optimizer.optimize_model(graph, **run_config)
                if config.float16:
                    island = fp32_island(optimizer.model.graph, island_starts)
                    with fp16_conversion_streams(read, spill):
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
            save_model(optimizer.model, output, read)
        finally:
            read.close()
            spill.close()
            (source.parent / spill.name).unlink(missing_ok=True)
        return ONNXModelHandler(model_path=str(output.parent), onnx_file_name=output.name)
