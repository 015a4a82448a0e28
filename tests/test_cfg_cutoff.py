"""``--cfg_cutoff``: guidance for the first fraction of the steps, then the UNet at batch 1 per image; against a
PyTorch reference (diffusers' SDXL pipeline with the same step callback) on the tiny model."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from PIL import Image

from sd_utils import app
from sd_utils.generation.cfg_cutoff import drop_guidance
from sd_utils.options import parse_options
from stable_diffusion_xl import main
from tests.test_parity import psnr

RUN = "--prompt a_red_star --negative_prompt blurry --guidance_scale 5 --num_inference_steps 10 --image_size 64"


def _options(workspace, *extra: str):
    args = workspace.tiny(RUN, *extra)
    args[args.index("a_red_star")] = "a red star"
    return parse_options(args)


def test_the_last_steps_run_the_batch_1_unet(tiny_optimized, tmp_path):
    """10 steps at cut-off 0.6: 6 UNet calls at batch 2 x 2 images, then 4 at batch 2 (no negative half)."""
    options = _options(tiny_optimized, "--cfg_cutoff", "0.6", "--num_images", "2", "--batch_size", "2")
    options = dataclasses.replace(options, output_dir=tmp_path)
    job = app.plan(options)
    generator = app.Generator(options, job, app.prepare_models(options, job))
    request = dataclasses.replace(job.request, text_chunks=generator._text_chunks(job.request))
    loaded, _ = generator._pipelines(request)
    assert loaded.unet_graph is None and loaded.shape.free_batch
    unet, batches = loaded.pipeline.unet, []
    forward = unet.forward
    unet.forward = lambda sample, *args, **kwargs: (batches.append(sample.shape[0]), forward(sample, *args, **kwargs))[
        1
    ]
    (first, _second) = generator.generate(job.request)
    assert batches == [4] * 6 + [2] * 4
    text = Image.open(first.path).text
    assert "CFG cutoff: 0.6" in text["parameters"] and text["cfg_cutoff"] == "0.6"
    again = tmp_path / "again"
    assert main(tiny_optimized.tiny(f"--output_dir {again}", "--from_png", str(first.path))) == 0
    (remade,) = again.glob("*.png")
    assert np.array_equal(np.asarray(Image.open(remade)), np.asarray(Image.open(first.path)))  # read back from it


def test_cutoff_matches_diffusers_with_the_same_callback(tiny_optimized, tiny_spec):
    """The ONNX pipeline (batch dims free) against diffusers' PyTorch SDXL pipeline, same latents, same algorithm:
    >= 60 dB in fp32, and far closer to it than to the reference without a cut-off (the tiny model's two halves
    differ little, so the cut-off changes its images only slightly)."""
    from diffusers import StableDiffusionXLPipeline

    from sd_utils.generation.run import CallInputs, _common_arguments

    cutoff = 0.3  # (0.8 measured too: 134.9 dB)
    options = _options(tiny_optimized, "--cfg_cutoff", str(cutoff), "--seed", "5")
    job = app.plan(options)
    generator = app.Generator(options, job, app.prepare_models(options, job))
    request = dataclasses.replace(job.request, text_chunks=1)
    loaded, _ = generator._pipelines(request)
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5))

    def step_end(pipe, step, timestep, tensors):
        return drop_guidance(pipe, step, cutoff, tensors)

    call = CallInputs(indices=[0], generators=None, latents=None, step_end=step_end)
    arguments = {key: value for key, value in _common_arguments(loaded, request, call).items() if key != "generator"}
    onnx = loaded.pipeline(**arguments, height=64, width=64, latents=latents.clone(), output_type="np").images

    reference = StableDiffusionXLPipeline.from_pretrained(tiny_spec.root, torch_dtype=torch.float32)
    torch_images = reference(
        prompt="a red star",
        negative_prompt="blurry",
        guidance_scale=5,
        num_inference_steps=10,
        height=64,
        width=64,
        latents=latents.clone(),
        callback_on_step_end=step_end,
        callback_on_step_end_tensor_inputs=reference._callback_tensor_inputs,
        output_type="np",
    ).images
    same = psnr(torch_images, onnx)
    assert same >= 60
    full = reference(
        prompt="a red star", negative_prompt="blurry", guidance_scale=5, num_inference_steps=10, height=64, width=64,
        latents=latents.clone(), output_type="np",
    ).images  # fmt: skip
    assert psnr(full, onnx) < same - 10  # far closer to the cut-off reference than to the run with guidance throughout


def test_cutoff_is_checked(tiny_optimized, tmp_path, capsys):
    for value, said in (("0", "--cfg_cutoff 0 would drop guidance"), ("1.5", "at most 1"), ("x", "a fraction")):
        assert main(tiny_optimized.tiny(RUN.replace("a_red_star", "x"), "--cfg_cutoff", value)) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and said in error[0], (value, error)


def test_a_cutoff_on_cuda_keeps_the_cuda_graph():
    """A free batch keeps the UNet's CUDA graph on CUDA, a graph per batch (without one the cut-off was slower than
    none on an H100, bench/NOTES.md); the CPU has none."""
    from sd_utils.runtime.pipeline import _uses_cuda_graph
    from sd_utils.runtime.providers import PROVIDERS
    from sd_utils.sources.model_spec import Shape

    shape = Shape(batch=1, height=64, width=64)
    for free_batch in (False, True):
        assert _uses_cuda_graph(PROVIDERS["cuda"], dataclasses.replace(shape, free_batch=free_batch), None)
        assert not _uses_cuda_graph(PROVIDERS["cpu"], dataclasses.replace(shape, free_batch=free_batch), None)
    assert not _uses_cuda_graph(PROVIDERS["cuda"], shape, False)


def test_a_session_per_batch_on_shared_weights_gives_the_free_batch_sessions_outputs(tiny_optimized, tiny_spec):
    """What --cfg_cutoff's CUDA graphs stand on, checked on the CPU with plain sessions in the graphs' place: the
    UNet pinned to each batch by ``batch_options``, its weights handed over as tensors (``shared_initializers``: no
    copy of its own), a session made per batch as the batch comes (``BatchGraphs``), gives the outputs of the
    session whose batch is free."""
    import onnxruntime as ort

    from sd_utils.runtime.controlnet import SessionRunner
    from sd_utils.runtime.cuda_graph import BatchGraphs, shared_initializers
    from sd_utils.runtime.pipeline import PartSessions, _dimensions
    from sd_utils.runtime.providers import PROVIDERS
    from sd_utils.sources.embeddings import Embeddings
    from sd_utils.sources.model_spec import Shape, submodel_io

    folder = tiny_optimized.build().optimized
    shape = Shape(batch=1, height=64, width=64, free_batch=True)
    dims, batch_dims = _dimensions(tiny_spec, shape, vae_tiling=False, controlnets=False)
    assert set(batch_dims.values()) == {2} and not any(
        name.startswith("unet_") and name.endswith("_batch") for name in dims
    )
    parts = PartSessions(folder, PROVIDERS["cpu"], 0, dims, Embeddings(), (), tiny_spec.root, batch_dims=batch_dims)
    model = folder / "unet" / "model.onnx"
    tensors, weights = shared_initializers(model, "cpu")
    assert weights and all(
        value.data_ptr() == tensor.data_ptr() for value, tensor in zip(weights.values(), tensors, strict=True)
    )

    def pinned(batch: int) -> SessionRunner:
        options = parts.batch_options(batch, weights)
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].shape[0] == batch  # the batch pinned, the rest as the other sessions
        return SessionRunner(session)

    per_batch = BatchGraphs(pinned, max(batch_dims.values()), (tensors, weights))
    free = parts.session("unet")
    contract = submodel_io(tiny_spec, "unet")
    for guidance in (True, False):
        inputs = contract.dummy_inputs(Shape(batch=1, height=64, width=64, classifier_free_guidance=guidance))
        feeds = dict(zip(contract.input_names, inputs, strict=True))
        expected = free.run(None, {name: tensor.numpy() for name, tensor in feeds.items()})[0]
        np.testing.assert_allclose(per_batch(feeds)[0].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert sorted(per_batch._runners) == [1, 2]
