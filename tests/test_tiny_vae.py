"""``--vae DIR`` with a tiny autoencoder (diffusers' ``AutoencoderTiny``, the TAESD-XL layout) written here: the
build's VAE graphs come from it, and the images match diffusers' PyTorch pipeline with it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd_utils import app
from sd_utils.options import parse_options
from stable_diffusion_xl import main
from tests.test_parity import psnr


@pytest.fixture(scope="module")
def taesd(tmp_path_factory) -> Path:
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    blocks = (8, 8, 8, 8)
    vae = AutoencoderTiny(
        encoder_block_out_channels=blocks,
        decoder_block_out_channels=blocks,
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    )
    folder = tmp_path_factory.mktemp("taesd") / "taesd-tiny"
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


def test_tiny_autoencoder_images_match_diffusers(tiny_optimized, tiny_spec, taesd, tmp_path):
    from diffusers import AutoencoderTiny, StableDiffusionXLPipeline

    from sd_utils.generation.run import CallInputs, _common_arguments

    args = tiny_optimized.tiny("--num_inference_steps 4 --guidance_scale 5 --image_size 64 --seed 2", "--vae")
    options = parse_options([*args, str(taesd), "--prompt", "a red star", "--output_dir", str(tmp_path)])
    job = app.plan(options)
    generator = app.Generator(options, job, app.prepare_models(options, job))
    request = dataclasses.replace(job.request, text_chunks=1)
    loaded, _ = generator._pipelines(request)
    assert loaded.build_record["vae"].startswith(str(taesd))
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(2))
    call = CallInputs(indices=[0], generators=None, latents=None, step_end=None)
    arguments = {key: value for key, value in _common_arguments(loaded, request, call).items() if key != "generator"}
    onnx = loaded.pipeline(**arguments, height=64, width=64, latents=latents.clone(), output_type="np").images

    vae = AutoencoderTiny.from_pretrained(taesd)
    reference = StableDiffusionXLPipeline.from_pretrained(tiny_spec.root, vae=vae, torch_dtype=torch.float32)
    expected = reference(
        prompt="a red star", guidance_scale=5, num_inference_steps=4, height=64, width=64, latents=latents.clone(),
        output_type="np",
    ).images  # fmt: skip
    assert psnr(expected, onnx) >= 60

    # the CLI's files say which VAE made them; img2img encodes with the tiny encoder
    (made,) = generator.generate(job.request)
    assert Image.open(made.path).text["vae"] == "taesd-tiny"
    assert "VAE: taesd-tiny" in Image.open(made.path).text["parameters"]
    out = tmp_path / "img2img"
    img2img = tiny_optimized.tiny("--num_inference_steps 4 --strength 0.5", "--vae", str(taesd), "--prompt", "x")
    assert main([*img2img, "--base_images", str(made.path), "--output_dir", str(out)]) == 0
    (refined,) = out.glob("*.png")
    assert np.asarray(Image.open(refined)).std() > 1
