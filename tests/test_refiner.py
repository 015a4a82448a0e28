"""The refiner: ONNX img2img and the base -> refiner hand-off against diffusers, and the CLI around them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sd_utils.generation.base_images import load_base_images
from sd_utils.generation.request import GenerationRequest, RefineSettings
from sd_utils.generation.run import generate_images
from sd_utils.runtime.pipeline import load_pipeline
from sd_utils.runtime.providers import PROVIDERS
from sd_utils.sources.model_spec import ModelSpec, Shape
from stable_diffusion_xl import main
from tests.test_parity import psnr

CPU = PROVIDERS["cpu"]


@pytest.fixture(scope="module")
def refiner_spec(tiny_refiner_optimized):
    return ModelSpec.from_folder(tiny_refiner_optimized.models_dir / "builtin" / "tiny-refiner")


@pytest.fixture(scope="module")
def torch_refiner(refiner_spec):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_spec.root, torch_dtype=torch.float32)


def _seeded(seeds):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


@pytest.mark.parametrize("variant", ["optimized", "unoptimized"])
def test_img2img_matches_diffusers(tiny_refiner_optimized, refiner_spec, torch_refiner, base_image_files, variant):
    """Two base images, width != height, same weights, strength and seeds: PSNR >= 60 dB per image."""
    images = [
        image.image
        for image in load_base_images(
            [base_image_files / "rgb_96x64.png", base_image_files / "rgba_96x64.png"], size=None, multiple=32
        )
    ]
    assert images[0].size == (96, 64)
    call = {
        "prompt": ["a red circle", "a red circle"],
        "negative_prompt": ["blurry", "blurry"],
        "image": images,
        "strength": 0.6,
        "num_inference_steps": 5,
        "guidance_scale": 5.0,
        "aesthetic_score": 6.0,
        "negative_aesthetic_score": 2.5,
        "output_type": "np",
    }
    expected = torch_refiner(generator=_seeded([1, 2]), **call).images
    loaded = load_pipeline(
        getattr(tiny_refiner_optimized.build("tiny-refiner"), variant),
        refiner_spec,
        provider=CPU,
        shape=Shape(batch=2, height=64, width=96),
        model_label="tiny-refiner",
    )
    actual = loaded.pipeline(generator=_seeded([1, 2]), **call).images
    assert actual.shape == expected.shape == (2, 64, 96, 3)
    assert np.isfinite(actual).all()
    for index in range(2):
        assert psnr(expected[index], actual[index]) >= 60


def test_base_to_refiner_hand_off_matches_diffusers(
    tiny_refiner_optimized, tiny_spec, refiner_spec, torch_refiner, tmp_path
):
    """ONNX base + ONNX refiner (latents handed over) vs diffusers' denoising_end/denoising_start pair."""
    from diffusers import StableDiffusionXLPipeline

    torch_base = StableDiffusionXLPipeline.from_pretrained(tiny_spec.root, torch_dtype=torch.float32)
    width, height, steps, fraction = 96, 64, 10, 0.7
    latents = torch.randn((2, 4, height // 8, width // 8), generator=torch.Generator().manual_seed(9))
    prompt = "a blue square on the right"
    handed = torch_base(
        prompt=[prompt] * 2,
        width=width,
        height=height,
        num_inference_steps=steps,
        denoising_end=fraction,
        output_type="latent",
        latents=latents.clone(),
        generator=_seeded([20, 21]),
    ).images
    expected = torch_refiner(
        prompt=[prompt] * 2,
        image=handed,
        num_inference_steps=steps,
        denoising_start=fraction,
        generator=_seeded([20, 21]),
        output_type="np",
    ).images

    request = GenerationRequest(
        prompt=prompt,
        negative_prompt=None,
        num_images=2,
        batch_size=2,
        num_inference_steps=steps,
        guidance_scale=5.0,
        seed=20,
        width=width,
        height=height,
        high_noise_frac=fraction,
    )
    base_folder, refiner_folder = (tiny_refiner_optimized.build(name).optimized for name in ("tiny", "tiny-refiner"))
    base = load_pipeline(base_folder, tiny_spec, provider=CPU, shape=request.shape, model_label="tiny")
    refiner = load_pipeline(refiner_folder, refiner_spec, provider=CPU, shape=request.shape, model_label="tiny-refiner")
    steps_seen = []
    saved = generate_images(
        base,
        request,
        output_dir=tmp_path,
        refiner=refiner,
        latents=latents,
        on_step=lambda done, total: steps_seen.append((done, total)),
    )
    assert len(saved) == 2
    assert steps_seen[-1] == (steps, steps)
    assert [done for done, _ in steps_seen] == list(range(1, steps + 1))
    for image, reference in zip(saved, expected, strict=True):
        actual = np.asarray(Image.open(image.path).convert("RGB"), dtype=np.float64) / 255
        assert psnr(np.round(reference * 255) / 255, actual) >= 60
        assert Image.open(image.path).text["refiner_model"] == "tiny-refiner"


def test_refine_request_counts_the_steps_it_runs(base_image_files):
    images = tuple(load_base_images([base_image_files / "rgb_96x64.png"], size=None, multiple=32))
    request = GenerationRequest(
        prompt="x",
        negative_prompt=None,
        num_images=1,
        batch_size=1,
        num_inference_steps=10,
        guidance_scale=5.0,
        seed=0,
        width=96,
        height=64,
        refine=RefineSettings(images=images, strength=0.3),
    )
    assert request.steps_per_call == 3


def test_cli_refines_every_base_image(tiny_refiner_optimized, base_image_files, tmp_path, capsys):
    out = tmp_path / "out"
    files = [base_image_files / name for name in ("rgb_96x64.png", "gray_96x64.png", "rgb_128x128.png")]
    code = main(
        tiny_refiner_optimized.args(
            "--model_id",
            "tiny-refiner",
            "--provider",
            "cpu",
            "--prompt",
            "sharper",
            "--base_images",
            *map(str, files),
            "--num_images",
            "4",
            "--batch_size",
            "2",
            "--strength",
            "0.5",
            "--num_inference_steps",
            "4",
            "--seed",
            "30",
            "--aesthetic_score",
            "7",
            "--output_dir",
            str(out),
        )
    )
    assert code == 0, capsys.readouterr().err
    written = sorted(out.glob("*.png"))
    assert [path.name for path in written] == ["00000-30.png", "00001-31.png", "00002-32.png", "00003-33.png"]
    # the first base image sets the size; the others are converted and resized to it
    assert {Image.open(path).size for path in written} == {(96, 64)}
    texts = [Image.open(path).text for path in written]
    assert [text["base_image"] for text in texts] == [
        "rgb_96x64.png",
        "gray_96x64.png",
        "rgb_128x128.png",
        "rgb_96x64.png",
    ]
    assert texts[0]["strength"] == "0.5"
    assert texts[0]["aesthetic_score"] == "7.0"
    assert texts[0]["model"] == "tiny-refiner"


def test_cli_base_to_refiner_in_one_command(tiny_refiner_optimized, tmp_path):
    out = tmp_path / "out"
    code = main(
        tiny_refiner_optimized.tiny(
            "--refiner_model_id tiny-refiner --prompt x --num_images 3 --batch_size 2 "
            "--num_inference_steps 5 --high_noise_frac 0.6 --seed 4 --output_dir",
            str(out),
        )
    )
    assert code == 0
    written = sorted(out.glob("*.png"))
    assert len(written) == 3
    assert Image.open(written[0]).text["high_noise_frac"] == "0.6"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("--model_id tiny --mask_image {rgb}", "--mask_image needs --base_images"),
        ("--model_id tiny --base_images {rgb} --mask_image {rgb} {rgb}", "2 --mask_image files for 1 --base_images"),
        ("--model_id tiny --base_images {rgb} --mask_image {bad}", "--mask_image"),
        ("--model_id tiny-refiner", "is a refiner: give it images with --base_images"),
        ("--model_id tiny-refiner --base_images {missing}", "no such file"),
        ("--model_id tiny-refiner --base_images {bad}", "is not a readable image"),
        ("--model_id tiny-refiner --base_images {rgb} --strength 0", "--strength 0.0 is outside (0, 1]"),
        ("--model_id tiny-refiner --base_images {rgb} --strength 1.5", "--strength 1.5 is outside (0, 1]"),
        ("--model_id tiny-refiner --base_images {rgb} {rgb} --num_images 1", "--num_images 1 is fewer than the 2"),
        ("--model_id tiny --refiner_model_id tiny --high_noise_frac 0.5", "is not a refiner"),
        ("--model_id tiny --refiner_model_id tiny-refiner --high_noise_frac 1", "--high_noise_frac 1.0 is outside"),
        ("--model_id tiny-refiner --base_images {rgb} --refiner_model_id tiny-refiner", "two different flows"),
    ],
)
def test_refiner_errors_are_one_line(workspace, base_image_files, tmp_path, capsys, args, message):
    paths = {
        "rgb": base_image_files / "rgb_96x64.png",
        "missing": tmp_path / "missing.png",
        "bad": base_image_files / "not_an_image.png",
    }
    out = tmp_path / "out"
    code = main(
        workspace.args("--provider", "cpu", "--prompt", "x", "--output_dir", str(out), *args.format(**paths).split())
    )
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists() or not list(out.iterdir())
