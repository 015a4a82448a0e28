"""ControlNet: the ONNX pipeline against diffusers' PyTorch SDXL ControlNet pipelines on tiny ControlNets written
here (``ControlNetModel.from_unet`` with random output convolutions), canny maps against OpenCV, and bad input."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from lora_files import write_controlnet, write_peft_lora
from PIL import Image, ImageDraw

from sd_utils import app
from sd_utils.optimize.controlnets import controlnet_folder
from sd_utils.options import parse_options
from sd_utils.runtime.providers import PROVIDERS
from sd_utils.sources.controlnet import resolve_controlnet
from stable_diffusion_xl import main
from tests.test_parity import psnr

SIZE = (96, 64)  # width, height: not square, not the model's default


@pytest.fixture(scope="module")
def nets(tiny_optimized, tmp_path_factory) -> dict[str, Path]:
    root = tiny_optimized.models_dir / "builtin" / "tiny"
    folder = tmp_path_factory.mktemp("controlnets")
    shapes = Image.new("RGB", SIZE, "black")
    draw = ImageDraw.Draw(shapes)
    draw.ellipse((10, 8, 50, 56), fill="white")
    draw.rectangle((60, 10, 90, 40), fill=(200, 80, 30))
    shapes.save(folder / "shapes.png")
    stripes = Image.new("RGB", SIZE, "black")
    for x in range(0, SIZE[0], 12):
        ImageDraw.Draw(stripes).rectangle((x, 0, x + 5, SIZE[1]), fill="white")
    stripes.save(folder / "stripes.png")
    return {
        "canny": write_controlnet(root, folder / "canny", seed=1),
        "depth": write_controlnet(root, folder / "depth", seed=2),
        "shapes": folder / "shapes.png",
        "stripes": folder / "stripes.png",
        "root": root,
        "lora": write_peft_lora(root, folder / "style.safetensors"),
    }


def _generator(workspace, *extra: str):
    options = parse_options(workspace.tiny("--prompt", "a red star", "--negative_prompt", "blurry", *extra))
    job = app.plan(options)
    return options, job, app.Generator(options, job, app.prepare_models(options, job))


def _onnx_images(generator, request, latents) -> np.ndarray:
    from sd_utils.generation.run import _common_arguments, _control

    request = app.dataclasses.replace(request, text_chunks=1)
    loaded, _ = generator._pipelines(request)
    arguments = {key: value for key, value in _common_arguments(loaded, request, _Call()).items() if key != "generator"}
    key = "image" if request.refine is None else "control_image"
    if request.refine is not None:
        arguments.update(image=[request.refine.images[0].image], strength=request.refine.strength)
    else:
        arguments.update(height=request.height, width=request.width, latents=latents.clone())
    return loaded.pipeline(**arguments, **_control(request, key), output_type="np").images


class _Call:
    """What ``_common_arguments`` reads of a call: one image, no generators, no step callback."""

    indices = (0,)
    generators = None
    step_end = None


def _torch_images(nets: dict, request, latents, *, mode: str = "text2img") -> np.ndarray:
    import diffusers
    from diffusers import ControlNetModel

    control = request.control
    models = [ControlNetModel.from_pretrained(net.root) for net in control.nets]
    name = {
        "text2img": "StableDiffusionXLControlNetPipeline",
        "img2img": "StableDiffusionXLControlNetImg2ImgPipeline",
        "inpaint": "StableDiffusionXLControlNetInpaintPipeline",
    }[mode]
    img2img = mode != "text2img"
    pipeline = getattr(diffusers, name).from_pretrained(nets["root"], controlnet=models, torch_dtype=torch.float32)
    if request.loras:
        from safetensors.torch import load_file

        names = [f"l{index}" for index in range(len(request.loras))]
        for adapter, lora in zip(names, request.loras, strict=True):
            pipeline.load_lora_weights(load_file(lora.path), adapter_name=adapter)
        pipeline.set_adapters(names, adapter_weights=[lora.scale for lora in request.loras])
    arguments = dict(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        output_type="np",
        **control.arguments("control_image" if img2img else "image"),
    )
    if img2img:
        generator = torch.Generator().manual_seed(0)
        arguments.update(image=[request.refine.images[0].image], strength=request.refine.strength, generator=generator)
        if mode == "inpaint":
            arguments.update(mask_image=[request.refine.masks[0].image], height=request.height, width=request.width)
    else:
        arguments.update(height=request.height, width=request.width, latents=latents.clone())
    return pipeline(**arguments).images


def test_controlnets_match_diffusers(tiny_optimized, nets):
    """One ControlNet at two scales, two at once (with a guidance window), one with a run-time LoRA: the ONNX
    pipeline equals diffusers' PyTorch SDXL ControlNet pipeline with the same latents (>= 60 dB, fp32), and the
    control changes the image."""
    latents = torch.randn((1, 4, SIZE[1] // 8, SIZE[0] // 8), generator=torch.Generator().manual_seed(3))
    common = ["--num_inference_steps", "3", "--width", str(SIZE[0]), "--height", str(SIZE[1]), "--seed", "1"]
    canny = ["--control_image", str(nets["shapes"]), "--control_preprocess", "canny"]
    cases = [
        ["--controlnet", f"{nets['canny']}:1.0", *canny],
        ["--controlnet", f"{nets['canny']}:0.4", *canny],
        ["--controlnet", f"{nets['canny']}:0.7", "--control_image", str(nets["shapes"]),
         "--controlnet", f"{nets['depth']}:0.5", "--control_image", str(nets["stripes"]), "--control_end", "0.7"],
        # a run-time LoRA reaches the UNet that takes the residuals (and the text encoders)
        ["--controlnet", f"{nets['canny']}:0.8", *canny, "--lora", f"{nets['lora']}:0.7"],
    ]  # fmt: skip
    _, job, plain = _generator(tiny_optimized, *common)
    without = _onnx_images(plain, job.request, latents)
    for case in cases:
        _, job, generator = _generator(tiny_optimized, *common, *case)
        onnx_images = _onnx_images(generator, job.request, latents)
        assert psnr(_torch_images(nets, job.request, latents), onnx_images) >= 60, case
        assert psnr(without, onnx_images) < 30, case  # the control changed the image


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_img2img_and_inpainting_with_a_controlnet_match_diffusers(tiny_optimized, nets, mode):
    base = ["--num_inference_steps", "4", "--base_images", str(nets["stripes"]), "--strength", "0.6", "--seed", "0"]
    if mode == "inpaint":
        base += ["--mask_image", str(nets["shapes"])]
    control = ["--controlnet", f"{nets['canny']}:0.8", "--control_image", str(nets["shapes"])]
    _, job, generator = _generator(tiny_optimized, *base, *control)
    request = job.request
    from sd_utils.generation.run import _common_arguments

    loaded, _ = generator._pipelines(app.dataclasses.replace(request, text_chunks=1))
    arguments = _common_arguments(loaded, request, _Call())
    arguments.update(generator=torch.Generator().manual_seed(0), image=[request.refine.images[0].image])
    if mode == "inpaint":
        arguments.update(mask_image=[request.refine.masks[0].image], height=request.height, width=request.width)
    onnx_images = loaded.pipeline(
        **arguments, strength=0.6, output_type="np", **request.control.arguments("control_image")
    ).images
    assert psnr(_torch_images(nets, request, None, mode=mode), onnx_images) >= 60


def test_canny_maps_are_opencvs(nets):
    import cv2

    from sd_utils.generation.control_images import load_control_image

    made = load_control_image(nets["shapes"], size=SIZE, preprocess="canny", low=50, high=150)
    gray = cv2.cvtColor(np.asarray(Image.open(nets["shapes"]).convert("RGB")), cv2.COLOR_RGB2GRAY)
    expected = cv2.Canny(gray, 50, 150)
    pixels = np.asarray(made.image)
    assert pixels.shape == (SIZE[1], SIZE[0], 3) and (pixels == expected[..., None]).all() and expected.any()


def test_cli_run_records_the_controlnet_and_bad_input_is_one_line(tiny_optimized, nets, tmp_path, capsys):
    args = tiny_optimized.tiny("--prompt x --num_inference_steps 2 --seed 4 --image_size 64", "--output_dir")
    control = ["--controlnet", f"{nets['canny']}:0.8", "--control_image", str(nets["shapes"])]
    assert main([*args, str(tmp_path / "out"), *control, "--control_preprocess", "canny"]) == 0
    (png,) = (tmp_path / "out").glob("*.png")
    text = Image.open(png).text
    assert 'ControlNet 0: "Module: canny, Model: canny [' in text["parameters"] and "Weight: 0.8" in text["parameters"]
    assert text["controlnets"].startswith("canny:0.8:") and text["control_images"] == "shapes.png (canny)"
    # a build follows the weights' content: a copy elsewhere finds it, and the PNG's hash is the file's SHA-256
    copy = tmp_path / "copied-net"
    shutil.copytree(nets["canny"], copy)
    spec = app.plan(parse_options([*args, str(tmp_path / "out")])).model.spec
    built, moved = (resolve_controlnet(str(net), 1.0, base=spec, models_dir=tmp_path) for net in (nets["canny"], copy))
    assert controlnet_folder(built, PROVIDERS["cpu"], models_dir=tmp_path).name.removeprefix("canny") == (
        controlnet_folder(moved, PROVIDERS["cpu"], models_dir=tmp_path).name.removeprefix("copied-net")
    )
    weights = nets["canny"] / "diffusion_pytorch_model.safetensors"
    assert f"Model: canny [{hashlib.sha256(weights.read_bytes()).hexdigest()[:8]}]" in text["parameters"]

    capsys.readouterr()
    sd15 = tmp_path / "sd15"
    sd15.mkdir()
    config = (nets["canny"] / "config.json").read_text().replace('"cross_attention_dim": ', '"cross_attention_dim": 7')
    (sd15 / "config.json").write_text(config)
    cases = [
        ([*control[:2]], "1 --controlnet and 0 --control_image"),
        (["--controlnet", str(sd15), "--control_image", str(nets["shapes"])], "another architecture"),
        (["--controlnet", str(nets["canny"]), "--control_image", str(tmp_path / "none.png")], "no such file"),
        (["--controlnet", str(tmp_path / "missing"), "--control_image", str(nets["shapes"])], "no such folder"),
        (
            [
                *control,
                "--base_images",
                str(nets["shapes"]),
                "--mask_image",
                str(nets["stripes"]),
                "--cfg_cutoff",
                "0.5",
            ],
            "ControlNet inpainting runs guidance on every step",
        ),
    ]
    for extra, said in cases:
        assert main([*args, str(tmp_path / "bad"), *extra]) == 2, extra
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and said in error[0], (extra, error)
    assert not (tmp_path / "bad").exists()
