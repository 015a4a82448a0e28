"""ONNX (optimized and unoptimized, fp32 on CPU) against diffusers' PyTorch SDXL on the same tiny weights."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest
import torch

from sd_utils.generation.request import GenerationRequest
from sd_utils.generation.run import generate_images
from sd_utils.generation.schedulers import SAMPLERS, make_scheduler
from sd_utils.runtime.pipeline import load_pipeline
from sd_utils.runtime.providers import PROVIDERS
from sd_utils.sources.model_spec import Shape, submodel_io

VARIANTS = ("optimized", "unoptimized")
CPU = PROVIDERS["cpu"]


def psnr(reference: np.ndarray, candidate: np.ndarray, peak: float = 1.0) -> float:
    """PSNR in dB; with ``PSNR_LOG=FILE`` in the environment each figure is also appended to FILE with the test's
    name (the closing notes quote them)."""
    mse = float(np.mean((reference.astype(np.float64) - candidate.astype(np.float64)) ** 2))
    value = float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)
    if os.environ.get("PSNR_LOG"):
        with open(os.environ["PSNR_LOG"], "a", encoding="utf-8") as log:
            log.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}\t{value:.2f}\n")
    return value


@pytest.fixture(scope="module")
def torch_pipeline(tiny_spec):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_spec.root, torch_dtype=torch.float32)


def _session(workspace, variant: str, submodel: str) -> ort.InferenceSession:
    path = getattr(workspace.build(), variant) / submodel / "model.onnx"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("submodel", ["text_encoder", "text_encoder_2"])
def test_text_encoder_matches_torch(tiny_optimized, tiny_spec, torch_pipeline, variant, submodel):
    tokenizer = torch_pipeline.tokenizer_2 if submodel == "text_encoder_2" else torch_pipeline.tokenizer
    ids = tokenizer(
        ["a red circle on the left", "two blue squares"],
        padding="max_length",
        max_length=tiny_spec.text_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        expected = getattr(torch_pipeline, submodel)(ids, output_hidden_states=True)
    session = _session(tiny_optimized, variant, submodel)
    outputs = dict(
        zip([o.name for o in session.get_outputs()], session.run(None, {"input_ids": ids.numpy()}), strict=True)
    )
    # what SDXL uses: the penultimate hidden state, and the pooled projection of the second encoder
    penultimate = f"hidden_states.{tiny_spec.text_num_layers[submodel] - 1}"
    np.testing.assert_allclose(outputs[penultimate], expected.hidden_states[-2].numpy(), atol=1e-4, rtol=1e-4)
    if submodel == "text_encoder_2":
        np.testing.assert_allclose(outputs["text_embeds"], expected.text_embeds.numpy(), atol=1e-4, rtol=1e-4)
    assert all(np.isfinite(value).all() for value in outputs.values())


@pytest.mark.parametrize("variant", VARIANTS)
def test_unet_step_matches_torch(tiny_optimized, tiny_spec, torch_pipeline, variant):
    shape = Shape(batch=1, height=96, width=128)
    contract = submodel_io(tiny_spec, "unet")
    inputs = dict(zip(contract.input_names, contract.dummy_inputs(shape), strict=True))
    with torch.no_grad():
        expected = torch_pipeline.unet(
            inputs["sample"],
            inputs["timestep"],
            inputs["encoder_hidden_states"],
            added_cond_kwargs={"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]},
        ).sample.numpy()
    (actual,) = _session(tiny_optimized, variant, "unet").run(None, {k: v.numpy() for k, v in inputs.items()})
    assert np.isfinite(actual).all()
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("variant", VARIANTS)
def test_vae_decoder_matches_torch(tiny_optimized, tiny_spec, torch_pipeline, variant):
    latents = torch.randn((2, tiny_spec.latent_channels, 12, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = torch_pipeline.vae.decode(latents).sample.numpy()
    (actual,) = _session(tiny_optimized, variant, "vae_decoder").run(None, {"latent_sample": latents.numpy()})
    assert np.isfinite(actual).all()
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("batch", "width", "height"), [(2, 128, 96), (1, 64, 112)])
def test_pipeline_images_match_torch(tiny_optimized, tiny_spec, torch_pipeline, variant, batch, width, height):
    """Same prompt, weights and initial latents: ONNX pipeline image vs diffusers' image, PSNR >= 60 dB."""
    latents = torch.randn(
        (batch, tiny_spec.latent_channels, height // tiny_spec.vae_scale_factor, width // tiny_spec.vae_scale_factor),
        generator=torch.Generator().manual_seed(7),
    )
    call = {
        "prompt": ["a red circle on the left, dark background"] * batch,
        "negative_prompt": ["blurry"] * batch,
        "width": width,
        "height": height,
        "num_inference_steps": 4,
        "guidance_scale": 5.0,
        "output_type": "np",
    }
    expected = torch_pipeline(latents=latents.clone(), **call).images
    loaded = load_pipeline(
        getattr(tiny_optimized.build(), variant),
        tiny_spec,
        provider=CPU,
        shape=Shape(batch=batch, height=height, width=width),
        model_label="tiny",
    )
    actual = loaded.pipeline(latents=latents.clone(), **call).images
    assert actual.shape == expected.shape == (batch, height, width, 3)
    assert np.isfinite(actual).all()
    assert psnr(expected, actual) >= 60


@pytest.mark.parametrize(
    ("negative_prompt", "classifier_free_guidance"), [(None, True), ("blurry", True), (None, False)]
)
def test_saved_pngs_match_torch(
    tiny_optimized, tiny_spec, torch_pipeline, tmp_path, negative_prompt, classifier_free_guidance
):
    """The PNG files ``generate_images`` writes (3 images in calls of 2, the prompts encoded once for the run) equal
    diffusers' images, image by image: with and without a negative prompt, and without guidance."""
    request = GenerationRequest(
        prompt="a green star",
        negative_prompt=negative_prompt,
        num_images=3,
        batch_size=2,
        num_inference_steps=3,
        guidance_scale=4.0,
        seed=11,
        width=96,
        height=64,
        classifier_free_guidance=classifier_free_guidance,
    )
    latents = torch.randn(
        (3, tiny_spec.latent_channels, 64 // tiny_spec.vae_scale_factor, 96 // tiny_spec.vae_scale_factor),
        generator=torch.Generator().manual_seed(5),
    )
    loaded = load_pipeline(
        tiny_optimized.build().optimized,
        tiny_spec,
        provider=CPU,
        shape=request.shape,
        model_label="tiny",
    )
    assert loaded.unet_graph is None  # CUDA graphs are for the CUDA EP only
    saved = generate_images(loaded, request, output_dir=tmp_path, latents=latents)
    assert [image.seed for image in saved] == [11, 12, 13]
    from PIL import Image

    for image, initial in zip(saved, latents, strict=True):
        expected = torch_pipeline(
            prompt="a green star",
            negative_prompt=negative_prompt,
            width=96,
            height=64,
            num_inference_steps=3,
            guidance_scale=request.effective_guidance_scale,
            latents=initial[None].clone(),
            output_type="np",
        ).images[0]
        actual = np.asarray(Image.open(image.path).convert("RGB"), dtype=np.float64) / 255
        assert psnr(np.round(expected * 255) / 255, actual) >= 60


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pil_images_are_diffusers_pil_images(dtype):
    """``to_pil_images`` (8-bit rounding where the image is) gives the pixels of diffusers' ``output_type="pil"``,
    rounding ties included, for fp32 and fp16 VAE outputs."""
    from diffusers.image_processor import VaeImageProcessor

    from sd_utils.generation.output import to_pil_images

    processor = VaeImageProcessor(vae_scale_factor=8)
    decoded = torch.randn((2, 3, 40, 24), generator=torch.Generator().manual_seed(3)) * 1.2
    decoded[0, 0, 0, :12] = torch.tensor([(k + 0.5) / 255 * 2 - 1 for k in range(12)])  # ties of x255 rounding
    decoded = decoded.to(dtype)
    expected = processor.postprocess(decoded, output_type="pil")
    actual = to_pil_images(processor.postprocess(decoded, output_type="pt"))
    assert [image.mode for image in actual] == ["RGB", "RGB"]
    for want, got in zip(expected, actual, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.fixture(scope="module")
def cpu_pipeline(tiny_optimized, tiny_spec):
    """The optimized tiny pipeline at one image of 64x64 with guidance, for the scheduler parity runs."""
    return load_pipeline(
        tiny_optimized.build().optimized,
        tiny_spec,
        provider=CPU,
        shape=Shape(batch=1, height=64, width=64),
        model_label="tiny",
    )


SCHEDULER_RUNS = [(name, None) for name in SAMPLERS] + [("euler", "trailing"), ("dpmpp_2m", "linspace")]


@pytest.mark.parametrize(("scheduler", "spacing"), SCHEDULER_RUNS, ids=[f"{n}-{s}" for n, s in SCHEDULER_RUNS])
def test_every_scheduler_matches_diffusers(cpu_pipeline, tiny_spec, torch_pipeline, tmp_path, scheduler, spacing):
    """--scheduler NAME: the ONNX pipeline's PNG against diffusers' PyTorch pipeline with the same scheduler, latents
    and seed (the ancestral and SDE samplers draw their noise from the same torch generator)."""
    from PIL import Image

    steps = 1 if scheduler == "lcm" else 4
    request = GenerationRequest(
        prompt="a red circle",
        negative_prompt=None,
        num_images=1,
        batch_size=1,
        num_inference_steps=steps,
        guidance_scale=4.0,
        seed=21,
        width=64,
        height=64,
        scheduler=scheduler,
        timestep_spacing=spacing,
    )
    latents = torch.randn((1, tiny_spec.latent_channels, 8, 8), generator=torch.Generator().manual_seed(9))
    (saved,) = generate_images(cpu_pipeline, request, output_dir=tmp_path, latents=latents)
    torch_pipeline.scheduler = make_scheduler(tiny_spec.scheduler_config, scheduler, spacing)
    expected = torch_pipeline(
        prompt="a red circle",
        width=64,
        height=64,
        num_inference_steps=steps,
        guidance_scale=4.0,
        latents=latents.clone(),
        generator=[torch.Generator().manual_seed(21)],
        output_type="np",
    ).images[0]
    assert type(cpu_pipeline.pipeline.scheduler) is type(torch_pipeline.scheduler)
    actual = np.asarray(Image.open(saved.path).convert("RGB"), dtype=np.float64) / 255
    assert psnr(np.round(expected * 255) / 255, actual) >= 60


def test_guidance_at_most_one_runs_the_unet_once_per_image(tiny_optimized, tiny_spec, tmp_path, monkeypatch):
    """Few-step models run without guidance: the UNet sees batch 1 per image (no unconditional half), its sessions
    pinned to that shape."""
    from optimum.onnxruntime.modeling_diffusion import ORTUnet

    request = GenerationRequest(
        prompt="x", negative_prompt=None, num_images=2, batch_size=1, num_inference_steps=2, guidance_scale=0.0,
        seed=1, width=64, height=64, scheduler="euler", timestep_spacing="trailing",
    )  # fmt: skip
    assert request.shape.classifier_free_guidance is False
    loaded = load_pipeline(
        tiny_optimized.build().optimized, tiny_spec, provider=CPU, shape=request.shape, model_label="tiny"
    )
    batches = []
    forward = ORTUnet.forward

    def counted(self, sample, *args, **kwargs):
        batches.append(sample.shape[0])
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(ORTUnet, "forward", counted)
    generate_images(loaded, request, output_dir=tmp_path)
    assert batches == [1, 1, 1, 1]  # 2 images x 2 steps, one image per UNet call
