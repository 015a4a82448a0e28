"""img2img and inpainting with the base model, through the run loop, against diffusers' SDXL pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sd_utils.generation.base_images import load_base_images, load_masks
from sd_utils.generation.request import GenerationRequest, RefineSettings
from sd_utils.generation.run import generate_images
from sd_utils.runtime.pipeline import load_pipeline
from sd_utils.runtime.providers import PROVIDERS
from stable_diffusion_xl import main
from tests.test_parity import psnr


@pytest.fixture(scope="module")
def mask_file(tmp_path_factory):
    """White (repaint) on the right half, black (keep) on the left, at another size than the base images."""
    folder = tmp_path_factory.mktemp("masks")
    mask = Image.new("L", (48, 32), 0)
    mask.paste(255, (24, 0, 48, 32))
    mask.save(folder / "mask.png")
    return folder / "mask.png"


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_base_image_to_image_matches_diffusers(tiny_optimized, tiny_spec, base_image_files, mask_file, tmp_path, task):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

    images = tuple(load_base_images([base_image_files / "rgb_96x64.png"], size=None, multiple=32))
    masks = tuple(load_masks([mask_file], size=(96, 64))) if task == "inpaint" else ()
    refine = RefineSettings(images=images, strength=0.6, masks=masks)
    request = GenerationRequest(
        prompt="a red circle", negative_prompt="blurry", num_images=2, batch_size=1, num_inference_steps=5,
        guidance_scale=5.0, seed=31, width=96, height=64, refine=refine,
    )  # fmt: skip
    assert request.task == task
    loaded = load_pipeline(
        tiny_optimized.build().optimized, tiny_spec, provider=PROVIDERS["cpu"], shape=request.shape,
        model_label="tiny", task=task,
    )  # fmt: skip
    saved = generate_images(loaded, request, output_dir=tmp_path)
    cls = StableDiffusionXLInpaintPipeline if task == "inpaint" else StableDiffusionXLImg2ImgPipeline
    reference = cls.from_pretrained(tiny_spec.root, torch_dtype=torch.float32)
    call = {"prompt": "a red circle", "negative_prompt": "blurry", "image": images[0].image, "strength": 0.6}
    if task == "inpaint":
        call.update(mask_image=masks[0].image, height=64, width=96)
    for image in saved:
        expected = reference(
            **call, num_inference_steps=5, guidance_scale=5.0, output_type="np",
            generator=[torch.Generator().manual_seed(image.seed)],
        ).images[0]  # fmt: skip
        actual = np.asarray(Image.open(image.path).convert("RGB"), dtype=np.float64) / 255
        assert psnr(np.round(expected * 255) / 255, actual) >= 60
        assert Image.open(image.path).text["strength"] == "0.6"


def test_cli_inpaints_with_the_base_model(tiny_optimized, base_image_files, mask_file, tmp_path):
    """--base_images with a base model and --mask_image: an image at the base image's size, the mask recorded; the
    default strength for a base model is A1111's 0.75."""
    out = tmp_path / "out"
    args = ["--base_images", str(base_image_files / "rgb_128x128.png"), "--mask_image", str(mask_file)]
    assert (
        main(tiny_optimized.tiny("--prompt x --seed 3 --num_inference_steps 8", *args, "--output_dir", str(out))) == 0
    )
    (png,) = out.glob("*.png")
    image = Image.open(png)
    assert image.size == (128, 128)
    assert image.text["strength"] == "0.75" and image.text["mask_image"] == "mask.png"
