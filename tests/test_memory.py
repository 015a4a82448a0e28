"""Running out of memory is one line that says what to lower, and loses nothing.

The end-to-end case is a real ONNX Runtime allocation failure: the CLI runs in a child process whose sessions allocate
from an ONNX Runtime arena capped at 64 MiB (ORT's own ``create_and_register_allocator`` + ``use_env_allocators``),
which a 512x512 image of the tiny model outgrows, as a 1024² SDXL image outgrows a 12-GB card (bench/NOTES.md, run 9).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sd_utils.errors import OutOfMemoryError, ProviderUnavailableError
from sd_utils.runtime.providers import PROVIDERS, _not_started, out_of_memory, out_of_memory_error
from tests.test_gpu_graphs import GPU_ONLY, _cuda_available

PROJECT_DIR = Path(__file__).resolve().parent.parent

# what ONNX Runtime said on the H100 (bench/results/2026-11-27-h100-memory-fit-run9.json) and on this CPU build
ARENA_FULL = (
    "Non-zero status code returned while running Transpose node. Name:'Transpose_86' Status Message: "
    "/onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:360 void* onnxruntime::BFCArena::AllocateRawInternal("
    "size_t, bool, onnxruntime::Stream*) Failed to allocate memory for requested buffer of size 1073741824\n"
)
ARENA_CAPPED = (
    "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Attention node. Name:'Attention_1' "
    "Status Message: /onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:360 void* onnxruntime::BFCArena::"
    "AllocateRawInternal(size_t, bool, onnxruntime::Stream*) Available memory of 14450944 is smaller than requested "
    "bytes of 33554432\n"
)
TEMPLATE = (
    "/onnxruntime_src/onnxruntime/core/providers/cuda/cuda_call.cc:154 std::conditional_t<THRW, void, onnxruntime::"
    "common::Status> onnxruntime::CudaCall(ERRTYPE, const char*, const char*, SUCCTYPE, const char*, const char*, int) "
    "[with ERRTYPE = {0}; bool THRW = true; SUCCTYPE = {0}; std::conditional_t<THRW, void, common::Status> = void] "
)
# the probe session with 50 MiB of the H100 free (bench/NOTES.md, run 12); ORT words cuBLAS's status
CUBLAS_HANDLE = (
    "[ONNXRuntimeError] : 1 : FAIL : Exception during initialization: "
    + TEMPLATE.format("cublasStatus_t")
    + "CUBLAS failure 3: the resource allocation failed ; GPU=0 ; hostname=vm ; file=/onnxruntime_src/onnxruntime/"
    "core/providers/cuda/cuda_execution_provider.cc ; line=245 ; expr=cublasCreate(&cublas_handle_); \n\n"
)
# a 1024² image with --vae_tiling and 10 GiB free: the UNet's CUDA graph capture broke (run 12)
CAPTURE_BROKEN = (
    "Error in execution: "
    + TEMPLATE.format("cudaError")
    + "CUDA failure 901: operation failed due to a previous error during capture ; GPU=0 ; hostname=vm ; "
    "file=/onnxruntime_src/onnxruntime/core/providers/cuda/cuda_graph.cc ; line=61 ; "
    "expr=cudaStreamEndCapture(stream_, &graph); "
)

# DirectML's HRESULT E_OUTOFMEMORY, in the form ONNX Runtime's DML provider reports failed HRESULTs
DML_OUT_OF_MEMORY = (
    "onnxruntime\\core\\providers\\dml\\DmlExecutionProvider\\src\\ExecutionProvider.cpp(563)\\"
    "onnxruntime_pybind11_state.pyd!00007FFB1A2B3C4D: (caller: 00007FFB1A2B3C4E) Exception(3) tid(1f2c) 8007000E Not "
    "enough memory resources are available to complete this operation."
)


@pytest.mark.parametrize(
    ("message", "shortfall"),
    [
        (ARENA_FULL, "ONNX Runtime could not allocate 1,024 MiB more"),
        (ARENA_CAPPED, "ONNX Runtime could not allocate 32 MiB more"),
        (CUBLAS_HANDLE, "CUBLAS failure 3: the resource allocation failed"),
        ("CUBLAS failure 3: CUBLAS_STATUS_ALLOC_FAILED ; GPU=0", "CUBLAS failure 3: CUBLAS_STATUS_ALLOC_FAILED"),
        (CAPTURE_BROKEN, "capturing the UNet's CUDA graph failed (CUDA failure 901)"),
        ("CUDA out of memory. Tried to allocate 2.00 GiB", "CUDA out of memory. Tried to allocate 2.00 GiB"),
        (DML_OUT_OF_MEMORY, "8007000E Not enough memory resources are available to complete this operation."),
        ("Non-zero status code returned while running Conv node: Invalid input shape: {1,4,8}", None),
    ],
)
def test_allocation_failures_are_recognised(message, shortfall):
    assert out_of_memory(RuntimeError(message)) == shortfall


def test_a_full_gpu_at_start_up_is_memory_not_a_broken_install():
    """With the GPU full, cuBLAS cannot even make its handle: in bench/NOTES.md runs 9 and 11 the tool blamed the
    install (run 11's message words cuBLAS's status, which the recogniser did not know)."""
    error = _not_started(PROVIDERS["cuda"], CUBLAS_HANDLE.strip().splitlines()[0])  # what start_problem passes on
    assert isinstance(error, OutOfMemoryError)
    message = str(error)
    assert message.startswith(
        "--provider cuda ran out of GPU memory starting CUDAExecutionProvider: CUBLAS failure 3: the resource "
        "allocation failed; use --provider cpu"
    )
    assert "use --provider cpu, or close other programs to free GPU memory" in message
    assert "GPU memory with --provider cuda, 10.5 GiB with --vae_tiling, 8.9 GiB with --low_vram" in message
    assert PROVIDERS["cuda"].needs not in message
    assert isinstance(_not_started(PROVIDERS["cuda"], "libcudnn.so.9: cannot open"), ProviderUnavailableError)


def test_without_a_fix_the_line_still_reads():
    shortfall = "ONNX Runtime could not allocate 8 MiB more"
    error = out_of_memory_error(PROVIDERS["cpu"], "loading models/optimized/tiny", shortfall, "")
    assert str(error) == (
        "--provider cpu ran out of memory loading models/optimized/tiny: ONNX Runtime could not allocate 8 MiB more; "
        "close other programs to free memory"
    )


CAPPED_RUN = """
import sys
import onnxruntime as ort

# every session of the tool allocates from one ONNX Runtime arena of 64 MiB
ort.create_and_register_allocator(
    ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT),
    ort.OrtArenaCfg(64 * 2**20, -1, -1, -1),
)
import dataclasses

from sd_utils.runtime.providers import PROVIDERS

# the tool's CPU row, its sessions taking their memory from that arena
capped = dataclasses.replace(PROVIDERS["cpu"], session_entries=(("session.use_env_allocators", "1"),))
import stable_diffusion_xl

sys.exit(stable_diffusion_xl.main(sys.argv[1:], provider_table={**PROVIDERS, "cpu": capped}))
"""


def test_running_out_of_memory_is_one_line_and_loses_nothing(tiny_optimized, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    earlier = output / "00000-7.png"
    earlier.write_bytes(b"an image of an earlier run")
    args = tiny_optimized.tiny("--width 512 --height 512 --num_inference_steps 2 --num_images 2 --prompt x")
    child = subprocess.run(
        [sys.executable, "-c", CAPPED_RUN, *args, "--output_dir", str(output)],
        capture_output=True,
        text=True,
        cwd=PROJECT_DIR,
        env={**os.environ, "PYTHONPATH": str(PROJECT_DIR)},
        timeout=600,
    )
    assert child.returncode == OutOfMemoryError.exit_code, child.stderr[-3000:]
    errors = [line for line in child.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: --provider cpu ran out of memory making 512x512 images in batches of 1 (images saved so far: 0 of 2): "
        "ONNX Runtime could not allocate 32 MiB more; lower --width/--height or --batch_size, or add --vae_tiling, or "
        "close other programs to free memory"
    ], child.stderr[-3000:]
    assert "Traceback" not in child.stderr
    assert sorted(output.iterdir()) == [earlier]  # no partial PNG, and the earlier image untouched
    assert earlier.read_bytes() == b"an image of an earlier run"


def _big_intermediate_model() -> bytes:
    """x[1] -> Expand to 128 Mi floats (512 MiB) -> Add x -> ReduceMax -> y[1]: each run needs 1 GiB of scratch."""
    from onnx import TensorProto, helper, numpy_helper

    shape = numpy_helper.from_array(np.array([2**27], dtype=np.int64), "shape")
    nodes = [
        helper.make_node("Expand", ["x", "shape"], ["wide"]),
        helper.make_node("Add", ["wide", "x"], ["sum"]),
        helper.make_node("ReduceMax", ["sum"], ["y"], keepdims=1),
    ]
    value = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1]) for name in ("x", "y")]
    graph = helper.make_graph(nodes, "big", value[:1], value[1:], initializer=[shape])
    return helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@pytest.mark.gpu
@GPU_ONLY
def test_cuda_sessions_share_one_arena():
    """With --provider cuda a session reuses the scratch memory an earlier session freed (providers.share_arena): one
    session's 1 GiB of intermediates is reserved once, not once per session, as it is without the shared arena."""
    import onnxruntime as ort
    import torch

    from sd_utils.runtime.providers import session_options, session_providers, share_arena

    cuda = PROVIDERS["cuda"]
    share_arena(cuda, 0)
    model = _big_intermediate_model()
    providers, provider_options = session_providers(cuda, 0)

    def grown_by(options) -> float:
        """GiB of device memory a new session's first run took and kept."""
        torch.cuda.synchronize()
        free = torch.cuda.mem_get_info()[0]
        session = ort.InferenceSession(model, options, providers=providers, provider_options=provider_options)
        (y,) = session.run(None, {"x": np.array([1.5], dtype=np.float32)})
        assert y.tolist() == [3.0]
        torch.cuda.synchronize()
        sessions.append(session)  # kept alive, as a pipeline keeps its sessions
        return (free - torch.cuda.mem_get_info()[0]) / 2**30

    sessions = []
    grown_by(session_options(cuda))  # the shared arena holds 1 GiB of scratch now (if earlier tests had not made it)
    second = grown_by(session_options(cuda))
    own = session_options(cuda)
    own.add_session_config_entry("session.use_env_allocators", "0")
    third = grown_by(own)
    assert third >= 0.5, f"a session with an arena of its own took only {third:.2f} GiB (the check measures nothing)"
    assert second < 0.25, f"a second session reserved {second:.2f} GiB more instead of reusing the shared arena"


@pytest.mark.skipif(_cuda_available(), reason="needs an onnxruntime build without the CUDA provider")
def test_an_onnxruntime_that_cannot_share_an_arena_still_runs(caplog):
    """This CPU build of ONNX Runtime refuses a CUDA env allocator, as an older or unusual build might: the sessions
    keep an arena each (a warning says so) instead of the run failing."""
    import dataclasses

    from sd_utils.runtime import providers

    refused = dataclasses.replace(PROVIDERS["cuda"], name="cuda-test")
    providers.share_arena(refused, 7)
    assert 7 not in providers._SHARED_ARENAS
    assert "ONNX Runtime sessions keep an arena each" in caplog.text
    assert "CUDAExecutionProvider is not implemented" in caplog.text
    options = providers.session_options(refused)
    assert options.get_session_config_entry("session.use_env_allocators") == "1"
    # weights outside the shared arena, which a CUDA graph captured earlier may still write (session 23's NaN)
    assert options.get_session_config_entry("session.use_device_allocator_for_initializers") == "1"


def _request(shape, **changes):
    """A short run of the tiny model at ``shape`` (its batch the run's batch size)."""
    from sd_utils.generation.request import GenerationRequest

    run = dict(prompt="a red circle", negative_prompt=None, num_images=1, num_inference_steps=2, guidance_scale=5.0)
    run.update(seed=11, batch_size=shape.batch, width=shape.width, height=shape.height)
    return GenerationRequest(**{**run, **changes})


def _low_vram_against_tiled(folder, spec, provider, shape, output_dir, monkeypatch, same):
    """``--low_vram``: the prompt is encoded once per run, then the text encoders' sessions are dropped (freed, not
    merely unused) and the base's VAE encoder, which text-to-image never runs, is not kept at all; a run with another
    prompt makes the text encoders again. The images are ``same`` as those of ``--vae_tiling`` alone."""
    import dataclasses
    import gc
    import weakref

    from optimum.onnxruntime.modeling_diffusion import ORTTextEncoder
    from PIL import Image

    from sd_utils.generation.run import generate_images
    from sd_utils.runtime.pipeline import load_pipeline

    request = _request(shape, negative_prompt="blue", num_images=3)
    pipelines = {
        name: load_pipeline(
            folder, spec, provider=provider, shape=shape, model_label="tiny", vae_tiling=True, low_vram=low_vram
        )
        for name, low_vram in (("tiled", False), ("low_vram", True))
    }
    low = pipelines["low_vram"].pipeline
    assert low.vae_encoder is None and low.vae.encoder is None and low.vae_decoder is not None
    encoder_sessions = [weakref.ref(low.text_encoder.session), weakref.ref(low.text_encoder_2.session)]
    encoded = []  # one entry per text encoder run, of either pipeline

    def counted(self, *args, _forward=ORTTextEncoder.forward, **kwargs):
        encoded.append(Path(self.session._model_path).parent.name)  # a name: keeps no part alive
        return _forward(self, *args, **kwargs)

    monkeypatch.setattr(ORTTextEncoder, "forward", counted)

    def pixels(name: str, run: str, prompt: str) -> list[np.ndarray]:
        ask = dataclasses.replace(request, prompt=prompt)
        saved = generate_images(pipelines[name], ask, output_dir=output_dir / name / run)
        return [np.asarray(Image.open(image.path)) for image in saved]

    for run, prompt in (("first", "a red circle"), ("same prompt", "a red circle"), ("new prompt", "a green square")):
        before = len(encoded)
        gc.disable()  # dropped means freed at once, not at the next garbage collection
        try:
            low_images = pixels("low_vram", run, prompt)
            assert [ref() for ref in encoder_sessions] == [None, None]
        finally:
            gc.enable()
        assert low.text_encoder is None and low.text_encoder_2 is None
        assert len(low.parts) == 2  # the UNet and the VAE decoder
        tiled_images = pixels("tiled", run, prompt)
        # per pipeline: both encoders, for the prompt and the negative prompt, once per run and not once per call
        assert len(encoded) - before == (0 if run == "same prompt" else 2 * 2 * 2)
        assert len(low_images) == 3
        for low_image, tiled_image in zip(low_images, tiled_images, strict=True):
            same(low_image, tiled_image)


def test_low_vram_keeps_the_text_encoders_only_while_they_encode(tiny_optimized, tiny_spec, tmp_path, monkeypatch):
    from sd_utils.sources.model_spec import Shape

    folder = tiny_optimized.build().optimized
    shape = Shape(batch=2, height=64, width=64)
    _low_vram_against_tiled(
        folder, tiny_spec, PROVIDERS["cpu"], shape, tmp_path, monkeypatch, np.testing.assert_array_equal
    )


@pytest.mark.gpu
@GPU_ONLY
def test_cuda_low_vram_makes_text_encoders_again_beside_a_captured_unet(cuda_build, tiny_spec, tmp_path, monkeypatch):
    """The same on CUDA, where the text encoders of a new prompt are made while the UNet's CUDA graph, captured in the
    first run, holds its buffers in the shared arena: its replays must not write into the new encoders' weights.
    Two captures need not be bit-identical (cuDNN's algorithm choice), so the bar is the fp16 one."""
    from sd_utils.sources.model_spec import Shape
    from tests.test_gpu_graphs import CUDA_SHAPE
    from tests.test_parity import psnr

    def same(low_image, tiled_image):
        assert psnr(tiled_image, low_image, peak=255) >= 35

    shape = Shape(**CUDA_SHAPE)
    _low_vram_against_tiled(cuda_build, tiny_spec, PROVIDERS["cuda"], shape, tmp_path, monkeypatch, same)


def test_cli_low_vram_tiles_the_decode(tiny_optimized, tmp_path):
    from PIL import Image

    from stable_diffusion_xl import main

    out = tmp_path / "out"
    args = tiny_optimized.tiny("--low_vram --width 128 --height 64 --num_inference_steps 2 --prompt x --seed 2")
    assert main([*args, "--output_dir", str(out)]) == 0
    (png,) = out.glob("*.png")
    assert Image.open(png).text["vae_tiling"] == "on"


def test_low_vram_running_out_making_the_text_encoders_again(tiny_optimized, tiny_spec, tmp_path):
    """A new prompt with ``--low_vram`` makes the text encoders again, which is where a small card runs out in the
    window (bench/NOTES.md, run 13): one line that says so, nothing written, and whatever was made for it dropped
    again, so a retry starts from the same state. The failure is ONNX Runtime's own text (H100, run 9)."""
    import dataclasses

    from sd_utils.generation.run import generate_images
    from sd_utils.runtime.pipeline import load_pipeline
    from sd_utils.sources.model_spec import Shape

    loaded = load_pipeline(
        tiny_optimized.build().optimized,
        tiny_spec,
        provider=PROVIDERS["cpu"],
        shape=Shape(batch=1, height=64, width=64),
        model_label="tiny",
        vae_tiling=True,
        low_vram=True,
    )
    request = _request(Shape(batch=1, height=64, width=64))
    assert len(generate_images(loaded, request, output_dir=tmp_path / "first")) == 1

    def second_fails(name: str):
        if name == "text_encoder_2":
            raise RuntimeError(ARENA_FULL)
        return loaded.new_text_encoder(name)

    short = dataclasses.replace(loaded, new_text_encoder=second_fails)
    new_prompt = dataclasses.replace(request, prompt="a green square")
    with pytest.raises(OutOfMemoryError) as error:
        generate_images(short, new_prompt, output_dir=tmp_path / "second")
    assert str(error.value) == (
        "--provider cpu ran out of memory loading the text encoders again for a new prompt (--low_vram): ONNX Runtime "
        "could not allocate 1,024 MiB more; keep the last prompt, or restart to start from free memory, or close other "
        "programs to free memory"
    )
    assert loaded.pipeline.text_encoder is None and loaded.pipeline.text_encoder_2 is None
    assert list((tmp_path / "second").glob("*.png")) == []
    assert len(generate_images(loaded, new_prompt, output_dir=tmp_path / "second")) == 1
