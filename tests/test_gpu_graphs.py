"""GPU-provider builds. DirectML graphs are checked here on the CPU (their fused ops only run on DirectML); the fp16
CUDA build is run on a GPU when one is present (marker ``gpu``)."""

from __future__ import annotations

import collections
import math

import numpy as np
import onnx
import pytest
import torch

from stable_diffusion_xl import main
from tests.test_parity import psnr


def _graph(folder, submodel):
    return onnx.load(str(folder / submodel / "model.onnx"), load_external_data=False).graph


def _ops(graph) -> collections.Counter:
    return collections.Counter(node.op_type for node in graph.node if node.domain == "com.microsoft")


def _initializer_types(graph) -> set[str]:
    """Float types of the weights; a Resize's scales (fp32 by the ONNX spec, 4 values) are no weight."""
    return {
        onnx.TensorProto.DataType.Name(tensor.data_type)
        for tensor in graph.initializer
        if tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and math.prod(tensor.dims) > 4
    }


def _io_types(graph) -> set[str]:
    return {
        onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type)
        for value in (*graph.input, *graph.output)
        if value.name != "input_ids"
    }


def _optimize_tiny(models, provider: str, cache_dir) -> None:
    args = ["--optimize", "--model_id", "tiny", "--provider", provider, "--models_dir", str(models)]
    assert main([*args, "--cache_dir", str(cache_dir)]) == 0


@pytest.fixture(scope="module")
def dml_build(tiny_optimized, tmp_path_factory):
    """``--optimize --provider dml`` of the tiny model, made on this CPU-only machine."""
    models = tmp_path_factory.mktemp("dml") / "models"
    _optimize_tiny(models, "dml", tiny_optimized.cache_dir)
    return models / "optimized" / "tiny"


def test_dml_unet_has_the_directml_fusions_in_fp16(dml_build):
    graph = _graph(dml_build, "unet")
    ops = _ops(graph)
    assert ops["MultiHeadAttention"] > 0
    assert ops["GroupNorm"] > 0
    # fusions DirectML has no kernel for stay off
    assert not {"NhwcConv", "BiasSplitGelu", "BiasAdd", "SkipLayerNormalization", "SkipGroupNorm"} & set(ops)
    # self-attention runs as MultiHeadAttention on one packed QKV input
    packed = [node for node in graph.node if node.op_type == "MultiHeadAttention" and len(node.input) == 1]
    assert packed
    assert _initializer_types(graph) == {"FLOAT16"}
    assert _io_types(graph) == {"FLOAT"}  # keep_io_types: the pipeline feeds fp32


def test_dml_text_encoders_are_fp16_with_fp32_io(dml_build):
    for encoder in ("text_encoder", "text_encoder_2"):
        graph = _graph(dml_build, encoder)
        assert _initializer_types(graph) == {"FLOAT16"}
        assert _io_types(graph) == {"FLOAT"}


def test_dml_vae_stays_fp32(dml_build):
    """SDXL's VAE overflows fp16 (black images): without an fp16-fixed VAE both VAE graphs keep fp32 weights."""
    for vae in ("vae_encoder", "vae_decoder"):
        graph = _graph(dml_build, vae)
        assert _initializer_types(graph) == {"FLOAT"}
        assert _io_types(graph) == {"FLOAT"}
        assert _ops(graph)["GroupNorm"] > 0


def _cuda_available() -> bool:
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception:  # noqa: BLE001 - no CUDA libraries: the test is skipped
            return False
    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


GPU_ONLY = pytest.mark.skipif(not _cuda_available(), reason="needs onnxruntime-gpu, torch with CUDA and an NVIDIA GPU")
CUDA_SHAPE = {"batch": 2, "height": 128, "width": 96}
CUDA_CALL = {"prompt": ["a red circle"] * 2, "num_inference_steps": 10, "height": 128, "width": 96, "output_type": "np"}


@pytest.fixture(scope="module")
def cuda_build(tiny_optimized, tmp_path_factory):
    models = tmp_path_factory.mktemp("cuda") / "models"
    _optimize_tiny(models, "cuda", tiny_optimized.cache_dir)
    return models / "optimized" / "tiny"


def _latents(seed: int):
    return torch.randn((2, 4, 16, 12), generator=torch.Generator().manual_seed(seed))


def _cuda_pipeline(folder, spec, **options):
    from sd_utils.generation import load_pipeline
    from sd_utils.model_spec import Shape
    from sd_utils.providers import PROVIDERS

    return load_pipeline(
        folder, spec, provider=PROVIDERS["cuda"], shape=Shape(**CUDA_SHAPE), model_label="tiny", **options
    )


def test_cuda_sessions_get_the_provider_options(monkeypatch, tmp_path):
    """Every CUDA session, the CUDA-graph UNet's included, fuses convolution biases (bench/NOTES.md, run 4)."""
    from sd_utils import generation
    from sd_utils.providers import PROVIDERS, session_providers

    cuda = PROVIDERS["cuda"]
    assert session_providers(cuda, 1) == (
        ["CUDAExecutionProvider", "CPUExecutionProvider"],
        [{"device_id": 1, "fuse_conv_bias": "1"}, {}],
    )
    assert session_providers(PROVIDERS["cpu"], 0) == (["CPUExecutionProvider"], [{}])
    seen = {}

    def graph_session(onnx_file, **kwargs):
        seen.update(kwargs)
        return object(), object()

    monkeypatch.setattr(generation, "cuda_graph_session", graph_session)
    runner = generation._cuda_graph_unet(tmp_path, cuda, 1, None)
    assert seen["extra_options"] == {"fuse_conv_bias": "1"} and seen["device_id"] == runner.device_id == 1


@pytest.mark.gpu
@GPU_ONLY
def test_cuda_fp16_images_match_fp32(tiny_optimized, tiny_spec, cuda_build):
    """The fp16 CUDA build against the fp32 CPU build on the same latents: no NaN, no black image, PSNR >= 35 dB."""
    from sd_utils.generation import load_pipeline
    from sd_utils.model_spec import Shape
    from sd_utils.providers import PROVIDERS

    fp32 = load_pipeline(
        tiny_optimized.models_dir / "optimized/tiny",
        tiny_spec,
        provider=PROVIDERS["cpu"],
        shape=Shape(**CUDA_SHAPE),
        model_label="tiny",
    ).pipeline(latents=_latents(0), **CUDA_CALL)
    fp16 = _cuda_pipeline(cuda_build, tiny_spec).pipeline(latents=_latents(0).cuda(), **CUDA_CALL).images
    assert np.isfinite(fp16).all()
    assert fp16.std() > 0.01  # not a flat (black) image
    assert psnr(fp32.images, fp16) >= 35


@pytest.mark.gpu
@GPU_ONLY
def test_cuda_graph_unet_matches_the_plain_session(tiny_spec, cuda_build):
    """``--provider cuda`` replays the UNet as a CUDA graph, queued without host waits, and gives the plain CUDA
    pipeline's images, run after run (new inputs are copied into the captured buffers, not ignored). Not
    bit-identical to the plain session: under capture cuDNN may pick other conv algorithms, so the bar is the fp16
    one (36 dB measured on the H100). Against the same graph with the host waiting for every step, any race between
    torch's stream and the replay's would show; none may."""
    plain = _cuda_pipeline(cuda_build, tiny_spec, cuda_graph=False)
    graphed = _cuda_pipeline(cuda_build, tiny_spec)
    assert plain.unet_graph is None and graphed.unet_graph is not None
    images = []
    for seed in (0, 1):
        expected = plain.pipeline(latents=_latents(seed).cuda(), **CUDA_CALL).images
        images.append(graphed.pipeline(latents=_latents(seed).cuda(), **CUDA_CALL).images)
        assert np.isfinite(images[-1]).all()
        assert psnr(expected, images[-1]) >= 35, f"seed {seed}"
    assert psnr(images[0], images[1]) < 30, "the second run replayed the first run's inputs"
    graphed.unet_graph.host_wait = True
    waited = graphed.pipeline(latents=_latents(1).cuda(), **CUDA_CALL).images
    assert psnr(waited, images[1]) >= 50


def test_fp16_fixed_vae_makes_the_vae_fp16_on_gpu_providers(tiny_optimized, tmp_path):
    """--use_fp16_fixed_vae DIR: the VAE graphs come from that VAE and are converted to fp16 with fp32 I/O."""
    models = tmp_path / "models"
    fixed_vae = tiny_optimized.models_dir / "builtin" / "tiny" / "vae"  # stands in for madebyollin/sdxl-vae-fp16-fix
    args = ["--optimize", "--model_id", "tiny", "--provider", "dml", "--use_fp16_fixed_vae", str(fixed_vae)]
    assert main([*args, "--models_dir", str(models), "--cache_dir", str(tiny_optimized.cache_dir)]) == 0
    folder = models / "optimized" / "tiny"
    for vae in ("vae_encoder", "vae_decoder"):
        graph = _graph(folder, vae)
        assert _initializer_types(graph) == {"FLOAT16"}
        assert _io_types(graph) == {"FLOAT"}
    assert (models / "composed" / "tiny+vae" / "vae" / "diffusion_pytorch_model.safetensors").is_file()
