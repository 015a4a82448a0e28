"""GPU-provider builds. DirectML graphs are checked here on the CPU (their fused ops only run on DirectML); the fp16
CUDA build is run on a GPU when one is present (marker ``gpu``)."""

from __future__ import annotations

import collections
import functools
import math
import re

import numpy as np
import onnx
import pytest
import torch

from stable_diffusion_xl import main
from tests.conftest import Workspace
from tests.test_parity import psnr
from tests.test_streaming_passes import ISLAND_START

FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


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
    return Workspace(models, tiny_optimized.cache_dir).build(provider="dml").optimized


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


# the VAE decoder's weights that stay fp32: its last up-block, the upsampler before it, the output norm and conv
FP32_ISLAND = re.compile(r"vae\.decoder\.(up_blocks\.3\.|up_blocks\.2\.upsamplers\.|conv_norm_out\.|conv_out\.)")


def test_dml_vae_encoder_stays_fp32(dml_build):
    """SDXL's VAE overflows fp16 (black images); img2img's encoder keeps fp32 weights without an fp16-fixed VAE."""
    graph = _graph(dml_build, "vae_encoder")
    assert _initializer_types(graph) == {"FLOAT"}
    assert _io_types(graph) == {"FLOAT"}
    assert _ops(graph)["GroupNorm"] > 0


def test_dml_vae_decoder_is_fp16_with_an_fp32_last_up_block(dml_build):
    """Where SDXL's decoder overflows fp16 (its last up-block) it stays fp32; the rest, most of its work, is fp16."""
    from sd_utils.optimize.fp16_islands import downstream_nodes

    graph = _graph(dml_build, "vae_decoder")
    assert _io_types(graph) == {"FLOAT"}
    weights = {tensor.name: tensor.data_type for tensor in graph.initializer}
    convs = {node.input[1]: weights[node.input[1]] for node in graph.node if node.op_type == "Conv"}
    expected = {name: FLOAT if FP32_ISLAND.match(name) else FLOAT16 for name in convs}
    assert convs == expected
    assert FLOAT in convs.values() and FLOAT16 in convs.values()
    norms = collections.Counter(weights[node.input[1]] for node in graph.node if node.op_type == "GroupNorm")
    assert norms[FLOAT] > 0 and norms[FLOAT16] > 0
    # the island's one Cast is the one into it (to fp32): no round trip through fp16 inside
    casts = [node for node in downstream_nodes(graph, [ISLAND_START]) if node.op_type == "Cast"]
    assert [(node.input[0], node.attribute[0].i) for node in casts] == [(ISLAND_START, FLOAT)]


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


def _latents(seed: int):
    return torch.randn((2, 4, 16, 12), generator=torch.Generator().manual_seed(seed))


def _cuda_pipeline(folder, spec, *, free_batch: bool = False, **options):
    """The tiny CUDA build loaded at CUDA_SHAPE (``free_batch``: as ``--cfg_cutoff`` loads it)."""
    from sd_utils.runtime.pipeline import load_pipeline
    from sd_utils.runtime.providers import PROVIDERS
    from sd_utils.sources.model_spec import Shape

    shape = Shape(**CUDA_SHAPE, free_batch=free_batch)
    return load_pipeline(folder, spec, provider=PROVIDERS["cuda"], shape=shape, model_label="tiny", **options)


CUDA_OPTIONS = {"fuse_conv_bias": "1", "arena_extend_strategy": "kSameAsRequested"}


def test_cuda_sessions_get_the_provider_options():
    """Every CUDA session, the CUDA-graph UNet's included, fuses convolution biases (bench/NOTES.md, run 4) and grows
    its memory arena by what it needs (bench/NOTES.md, bench/memory_fit.py)."""
    from sd_utils.runtime.cuda_graph import graph_provider_options
    from sd_utils.runtime.providers import PROVIDERS, session_providers

    cuda = PROVIDERS["cuda"]
    assert session_providers(cuda, 1) == (
        ["CUDAExecutionProvider", "CPUExecutionProvider"],
        [{"device_id": 1, **CUDA_OPTIONS}, {}],
    )
    assert session_providers(PROVIDERS["cpu"], 0) == (["CPUExecutionProvider"], [{}])
    # the CUDA-graph UNet's session (runtime.pipeline passes the provider row's options to cuda_graph_session)
    graph = graph_provider_options(1, 42, dict(cuda.options))
    assert graph == {"device_id": "1", "enable_cuda_graph": "1", "user_compute_stream": "42", **CUDA_OPTIONS}


@pytest.mark.gpu
@GPU_ONLY
def test_cuda_fp16_images_match_fp32(tiny_optimized, tiny_spec, cuda_build):
    """The fp16 CUDA build against the fp32 CPU build on the same latents: no NaN, no black image, PSNR >= 35 dB."""
    from sd_utils.runtime.pipeline import load_pipeline
    from sd_utils.runtime.providers import PROVIDERS
    from sd_utils.sources.model_spec import Shape

    fp32 = load_pipeline(
        tiny_optimized.build().optimized,
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
    """``--provider cuda`` replays the UNet as a CUDA graph and gives the plain CUDA pipeline's images, run after run
    (new inputs are copied into the captured buffers, not ignored). Not bit-identical to the plain session: under
    capture cuDNN may pick other conv algorithms, so the bar is the fp16 one (36 dB measured on the H100)."""
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


@pytest.mark.gpu
@GPU_ONLY
def test_a_free_batch_unet_picks_convolutions_by_heuristic(tiny_spec, cuda_build):
    """Under ``--cfg_cutoff`` without a CUDA graph (a UNet ORT cannot capture) the UNet meets two batch sizes: its
    session asks cuDNN's heuristic for convolutions and leaves the bias unfused (both were made again at every batch
    change: a full-size image 7x slower); the VAE keeps the exhaustive search and the fused bias."""
    loaded = _cuda_pipeline(cuda_build, tiny_spec, free_batch=True, cuda_graph=False)
    assert loaded.unet_graph is None

    def options(session):
        cuda = session.get_provider_options()["CUDAExecutionProvider"]
        return cuda["cudnn_conv_algo_search"], cuda["fuse_conv_bias"]

    assert options(loaded.pipeline.unet.session) == ("HEURISTIC", "0")
    assert options(loaded.pipeline.vae_decoder.session) == ("EXHAUSTIVE", "1")
    for guidance in (7, 0):  # the UNet at batch 4, then 2
        call = {**CUDA_CALL, "num_inference_steps": 3, "guidance_scale": guidance}
        assert np.isfinite(loaded.pipeline(latents=_latents(0).cuda(), **call).images).all()


def test_fp16_fixed_vae_makes_the_vae_fp16_on_gpu_providers(tiny_optimized, tmp_path):
    """--use_fp16_fixed_vae DIR: the VAE graphs come from that VAE and are converted to fp16 with fp32 I/O."""
    from sd_utils.optimize.recipe import BuildRecipe
    from sd_utils.sources.models import resolve_model

    models = tmp_path / "models"
    fixed_vae = tiny_optimized.models_dir / "builtin" / "tiny" / "vae"  # stands in for madebyollin/sdxl-vae-fp16-fix
    args = ["--optimize", "--model_id", "tiny", "--provider", "dml", "--use_fp16_fixed_vae", str(fixed_vae)]
    assert main([*args, "--models_dir", str(models), "--cache_dir", str(tiny_optimized.cache_dir)]) == 0
    model = resolve_model("tiny", models_dir=models)
    recipe = BuildRecipe.of(model, provider="dml", vae=str(fixed_vae), vae_root=fixed_vae)
    folder = recipe.paths(models).optimized
    for vae in ("vae_encoder", "vae_decoder"):
        graph = _graph(folder, vae)
        assert _initializer_types(graph) == {"FLOAT16"}
        assert _io_types(graph) == {"FLOAT"}
    assert (models / "composed" / "tiny+vae" / "vae" / "diffusion_pytorch_model.safetensors").is_file()


def _overflowing_vae_model(spec, folder):
    """The tiny model with its VAE changed so that fp16 overflows inside the decoder's last up-block only: the first
    convolution there computes 1e6 x its output. The GroupNorm after it divides that out again, so in fp32 the decoded
    images stay the same, as with SDXL's VAE, whose activations there exceed fp16's range by themselves."""
    from diffusers import AutoencoderKL

    folder.mkdir()
    for item in spec.root.iterdir():
        if item.name != "vae":
            (folder / item.name).symlink_to(item.resolve())
    vae = AutoencoderKL.from_pretrained(spec.root / "vae")
    conv = vae.decoder.up_blocks[-1].resnets[0].conv1
    with torch.no_grad():
        conv.weight.mul_(1e6)
        conv.bias.mul_(1e6)
    vae.save_pretrained(folder / "vae")
    return vae


@pytest.mark.gpu
@GPU_ONLY
def test_the_fp32_island_keeps_an_overflowing_vae_decoder_finite(tiny_spec, tmp_path):
    """The CUDA VAE decoder build (fp16, its last up-block an fp32 island) on a VAE that overflows fp16 there: finite
    and as the fp32 decode (PSNR >= 35 dB). The same build without the island gives inf/NaN: the overflow is real."""
    import onnxruntime as ort

    from sd_utils.optimize.olive_workflow import load_template, run_submodel, unsupported_fusions, workflow_config
    from sd_utils.runtime.providers import PROVIDERS

    vae = _overflowing_vae_model(tiny_spec, tmp_path / "model")
    latents = torch.randn((1, 4, 16, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = vae.decode(latents).sample.numpy()
    cuda = PROVIDERS["cuda"]
    images = {}
    for island in (True, False):
        config = workflow_config(
            load_template("vae_decoder"),
            submodel="vae_decoder",
            provider=cuda,
            model_path=tmp_path / "model",
            disabled_fusions=unsupported_fusions(tiny_spec, provider=cuda, submodel="vae_decoder"),
            cache_dir=tmp_path / "cache",
            output_dir=tmp_path / f"island-{island}",
        )
        if not island:
            del config["passes"][cuda.optimize_pass]["force_fp32_from"]
        _, onnx_file = run_submodel(config, submodel="vae_decoder", tempdir=tmp_path / "tmp")
        session = ort.InferenceSession(str(onnx_file), providers=[("CUDAExecutionProvider", {"device_id": 0})])
        (images[island],) = session.run(None, {"latent_sample": latents.numpy()})
    assert not np.isfinite(images[False]).all()
    assert np.isfinite(images[True]).all()
    assert psnr(expected, images[True], peak=2.0) >= 35  # pixels in [-1, 1]


@pytest.mark.gpu
@GPU_ONLY
def test_cuda_graph_controlnet_matches_the_plain_sessions(tiny_spec, cuda_build, tiny_optimized, tmp_path):
    """A ControlNet run on CUDA replays the ControlNet and the UNet that takes its residuals as CUDA graphs, and gives
    the plain CUDA sessions' images (the fp16 bar, as for the UNet alone); the control changes the image."""
    from lora_files import write_controlnet
    from PIL import Image, ImageDraw

    from sd_utils import app
    from sd_utils.options import parse_options

    control = Image.new("RGB", (CUDA_SHAPE["width"], CUDA_SHAPE["height"]), "black")
    ImageDraw.Draw(control).ellipse((10, 20, 80, 110), fill="white")
    control.save(tmp_path / "control.png")
    net = write_controlnet(tiny_spec.root, tmp_path / "net", seed=1)
    models = cuda_build.parent.parent
    argv = ["--model_id", "tiny", "--provider", "cuda", "--models_dir", str(models), "--prompt", "x", "--cache_dir"]
    argv += [str(tiny_optimized.cache_dir), "--controlnet", str(net), "--control_image", str(tmp_path / "control.png")]
    options = parse_options(argv)
    job = app.plan(options)
    folders = tuple(app.prepare_models(options, job).controlnets.values())
    call = {**CUDA_CALL, "image": [control]}
    plain = _cuda_pipeline(cuda_build, tiny_spec, cuda_graph=False, controlnets=folders)
    graphed = _cuda_pipeline(cuda_build, tiny_spec, controlnets=folders)
    assert plain.unet_graph is None and graphed.unet_graph is not None
    assert all(type(net.run).__name__ == "CudaGraphRunner" for net in graphed.controlnets)
    images = []
    for seed in (0, 1):
        expected = plain.pipeline(latents=_latents(seed).cuda(), **call).images
        images.append(graphed.pipeline(latents=_latents(seed).cuda(), **call).images)
        assert np.isfinite(images[-1]).all()
        assert psnr(expected, images[-1]) >= 35, f"seed {seed}"
    assert psnr(images[0], images[1]) < 30, "the second run replayed the first run's inputs"
    uncontrolled = _cuda_pipeline(cuda_build, tiny_spec).pipeline(latents=_latents(1).cuda(), **CUDA_CALL).images
    assert psnr(uncontrolled, images[1]) < 30


@pytest.mark.gpu
@GPU_ONLY
def test_cuda_graph_cutoff_replays_a_graph_per_batch(tiny_spec, cuda_build):
    """``--cfg_cutoff`` on CUDA: the UNet's batch halves within the run and each batch replays a CUDA graph of its
    own (a session per batch on one copy of the weights), giving the plain free-batch sessions' images (the fp16
    bar), seed after seed."""
    from sd_utils.generation.cfg_cutoff import drop_guidance

    def call(pipe):
        cut = functools.partial(drop_guidance, cutoff=0.6)
        return {
            **CUDA_CALL,
            "callback_on_step_end": lambda pipe, step, _, tensors: cut(pipe, step, callback_kwargs=tensors),
            "callback_on_step_end_tensor_inputs": list(pipe._callback_tensor_inputs),
        }

    plain = _cuda_pipeline(cuda_build, tiny_spec, free_batch=True, cuda_graph=False)
    graphed = _cuda_pipeline(cuda_build, tiny_spec, free_batch=True)
    assert plain.unet_graph is None and graphed.unet_graph is not None
    images = []
    for seed in (0, 1):
        expected = plain.pipeline(latents=_latents(seed).cuda(), **call(plain.pipeline)).images
        images.append(graphed.pipeline(latents=_latents(seed).cuda(), **call(graphed.pipeline)).images)
        assert np.isfinite(images[-1]).all()
        assert psnr(expected, images[-1]) >= 35, f"seed {seed}"
    assert sorted(graphed.unet_graph._runners) == [2, 4]  # two images with guidance, then without
    assert psnr(images[0], images[1]) < 30, "the second run replayed the first run's inputs"


@pytest.mark.gpu
@GPU_ONLY
def test_cuda_graph_deep_cache_matches_the_plain_sessions(tiny_spec, cuda_build, tiny_optimized):
    """``--cache_interval 3`` on CUDA replays the refresh and shallow graphs as CUDA graphs and gives the plain CUDA
    sessions' images under the same cache (the fp16 bar), seed after seed; the cache changes the image."""
    from sd_utils import app
    from sd_utils.options import parse_options

    models = cuda_build.parent.parent
    argv = ["--model_id", "tiny", "--provider", "cuda", "--models_dir", str(models), "--cache_dir"]
    options = parse_options([*argv, str(tiny_optimized.cache_dir), "--optimize", "--cache_interval", "3"])
    app.prepare_models(options, app.plan(options))
    plain = _cuda_pipeline(cuda_build, tiny_spec, free_batch=True, cuda_graph=False, deep_cache=True)  # halved below
    graphed = _cuda_pipeline(cuda_build, tiny_spec, deep_cache=True)
    assert plain.unet_graph is None and graphed.unet_graph is not None
    assert type(graphed.unet_cache.shallow).__name__ == "CudaGraphRunner"
    images = []
    for seed in (0, 1):
        plain.unet_cache.start(3)
        expected = plain.pipeline(latents=_latents(seed).cuda(), **CUDA_CALL).images
        graphed.unet_cache.start(3)
        images.append(graphed.pipeline(latents=_latents(seed).cuda(), **CUDA_CALL).images)
        assert np.isfinite(images[-1]).all() and graphed.unet_cache.refreshes == 4  # steps 0, 3, 6, 9 of 10
        assert psnr(expected, images[-1]) >= 35, f"seed {seed}"
    assert psnr(images[0], images[1]) < 30, "the second run replayed the first run's inputs"
    # without CUDA graphs both graphs run on device buffers bound once per batch (--cfg_cutoff halves it): the values
    # of the same sessions run through host arrays
    from sd_utils.runtime.controlnet import SessionRunner

    cache, fed = plain.unet_cache, []
    runners = {"refresh": cache.refresh, "shallow": cache.shallow}
    for name, runner in runners.items():
        assert type(runner).__name__ == "DeviceRunner"
        setattr(cache, name, lambda feeds, run=runner: fed.append((run, dict(feeds))) or run(feeds))
    cache.start(3)
    plain.pipeline(latents=_latents(0).cuda(), **{**CUDA_CALL, "num_inference_steps": 2})
    assert {id(run) for run, _ in fed} == {id(runner) for runner in runners.values()}
    for run, feeds in fed:
        batch = np.shape(feeds["sample"])[0]
        half = {
            name: value[: batch // 2] if np.shape(value)[:1] == (batch,) else value for name, value in feeds.items()
        }
        for batch_feeds in (feeds, half):
            expected = SessionRunner(run.session)(batch_feeds)
            for got, want in zip(run(batch_feeds), expected, strict=True):
                torch.testing.assert_close(got.float(), want.to(got.device), rtol=1e-2, atol=5e-3)  # fp16 ulps
