"""``--cache_interval`` (DeepCache): the refresh and shallow graphs against the plain UNet, the count of full UNet
runs, and the cached pipeline against a PyTorch reference of the same algorithm on the tiny model at an odd size."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from sd_utils import app
from sd_utils.options import parse_options
from sd_utils.sources.model_spec import Shape, submodel_io
from stable_diffusion_xl import main
from tests.test_parity import psnr

RUN = "--prompt a_red_star --negative_prompt blurry --guidance_scale 5 --width 80 --height 48"


def _generator(workspace, *extra: str, output_dir=None):
    args = workspace.tiny(RUN, *extra)
    args[args.index("a_red_star")] = "a red star"
    options = parse_options(args)
    if output_dir is not None:
        options = dataclasses.replace(options, output_dir=output_dir)
    job = app.plan(options)
    return app.Generator(options, job, app.prepare_models(options, job)), job


@pytest.fixture(scope="module")
def cached(tiny_optimized):
    """The tiny model's build with DeepCache's two graphs (built here, once, by the real Olive workflows)."""
    options = parse_options(tiny_optimized.tiny("--optimize --cache_interval 3"))
    job = app.plan(options)
    app.prepare_models(options, job)
    return tiny_optimized


def test_thirty_steps_at_interval_3_run_the_full_unet_ten_times(cached, tmp_path):
    generator, job = _generator(cached, "--num_inference_steps", "30", "--cache_interval", "3", output_dir=tmp_path)
    request = dataclasses.replace(job.request, text_chunks=1)
    loaded, _ = generator._pipelines(request)
    calls = {"refresh": 0, "shallow": 0}
    cache = loaded.unet_cache

    def counted(name, run):
        def run_counted(feeds):
            calls[name] += 1
            return run(feeds)

        return run_counted

    for name in calls:
        setattr(cache, name, counted(name, getattr(cache, name)))
    (image,) = generator.generate(job.request)
    assert calls == {"refresh": 10, "shallow": 20} and cache.refreshes == 10
    text = Image.open(image.path).text
    assert "DeepCache interval: 3" in text["parameters"] and text["cache_interval"] == "3"


def test_the_refresh_step_is_the_full_unet_and_the_shallow_step_its_outer_blocks(cached, tiny_spec):
    """On the same inputs: the refresh graph's noise = the plain UNet graph's; the shallow graph on the refresh
    graph's feature = the same noise again (nothing of the deep blocks is lost in the split)."""
    build = cached.build().optimized
    sessions = {
        name: ort.InferenceSession(str(build / name / "model.onnx"), providers=["CPUExecutionProvider"])
        for name in ("unet", "unet_refresh", "unet_shallow")
    }
    io = submodel_io(tiny_spec, "unet")
    tensors = io.dummy_inputs(Shape(batch=1, height=48, width=80))
    feeds = {name: tensor.numpy() for name, tensor in zip(io.input_names, tensors, strict=True)}
    (plain,) = sessions["unet"].run(None, feeds)
    noise, feature = sessions["unet_refresh"].run(None, feeds)
    shallow_inputs = {meta.name for meta in sessions["unet_shallow"].get_inputs()}
    (again,) = sessions["unet_shallow"].run(
        None, {**{k: v for k, v in feeds.items() if k in shallow_inputs}, "cache_feature": feature}
    )
    assert feature.shape == (2, tiny_spec.cache_channels, 6, 10)
    np.testing.assert_allclose(noise, plain, atol=1e-5)
    np.testing.assert_allclose(again, plain, atol=1e-4)


def _deep_cache_reference(unet, interval: int):
    """DeepCache in PyTorch on diffusers' own UNet, written apart from the tool: every ``interval``-th call (from the
    first) runs the whole UNet and keeps the input of its last up block; the others swap that input for the kept one
    (the deep blocks' result is then unused: the output is what the outer blocks make of the cached feature)."""
    state = {"calls": 0, "feature": None}
    last = unet.up_blocks[-1]

    def keep_or_swap(module, args, kwargs):
        if state["calls"] % interval == 0:
            state["feature"] = kwargs["hidden_states"]
            return None
        return args, {**kwargs, "hidden_states": state["feature"]}

    last.register_forward_pre_hook(keep_or_swap, with_kwargs=True)
    forward = unet.forward

    def counted(*args, **kwargs):
        out = forward(*args, **kwargs)
        state["calls"] += 1
        return out

    unet.forward = counted


def test_cached_pipeline_matches_a_pytorch_deepcache(cached, tiny_spec):
    """Same latents, 10 steps at interval 3, an 80x48 image: the ONNX pipeline against diffusers' SDXL pipeline over
    the reference above (>= 60 dB in fp32), and far closer to it than to the uncached reference."""
    from diffusers import StableDiffusionXLPipeline

    from sd_utils.generation.run import CallInputs, _common_arguments

    generator, job = _generator(cached, "--num_inference_steps", "10", "--cache_interval", "3", "--seed", "5")
    request = dataclasses.replace(job.request, text_chunks=1)
    loaded, _ = generator._pipelines(request)
    latents = torch.randn((1, 4, 6, 10), generator=torch.Generator().manual_seed(5))
    call = CallInputs(indices=[0], generators=None, latents=None, step_end=None)
    arguments = {key: value for key, value in _common_arguments(loaded, request, call).items() if key != "generator"}
    loaded.unet_cache.start(3)
    onnx = loaded.pipeline(**arguments, height=48, width=80, latents=latents.clone(), output_type="np").images

    call = dict(prompt="a red star", negative_prompt="blurry", guidance_scale=5, num_inference_steps=10)
    call.update(height=48, width=80, output_type="np")
    reference = StableDiffusionXLPipeline.from_pretrained(tiny_spec.root, torch_dtype=torch.float32)
    full = reference(**call, latents=latents.clone()).images
    _deep_cache_reference(reference.unet, 3)
    cached_reference = reference(**call, latents=latents.clone()).images
    same = psnr(cached_reference, onnx)
    assert same >= 60
    assert psnr(full, onnx) < same - 10


def test_the_shallow_export_splits_other_layouts(tmp_path):
    """The shallow module on a three-level UNet whose outer blocks attend to the text (SD 1.x's layout, unlike
    SDXL's): shallow(refresh's feature) = the full UNet's output."""
    from diffusers import UNet2DConditionModel

    from sd_utils.optimize.export_models import RefreshUNetExport, ShallowUNetExport
    from sd_utils.sources.model_spec import cache_channels

    config = dict(
        block_out_channels=(16, 32, 32), layers_per_block=1, cross_attention_dim=8, attention_head_dim=4,
        norm_num_groups=8, sample_size=8, in_channels=4, out_channels=4, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )  # fmt: skip
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).eval()
    unet.save_pretrained(tmp_path)
    inputs = (torch.randn(2, 4, 12, 20), torch.tensor(500.0), torch.randn(2, 7, 8))
    inputs += (torch.randn(2, 8), torch.randn(2, 6))
    with torch.no_grad():
        noise, feature = RefreshUNetExport(unet)(*inputs)
        shallow = ShallowUNetExport(UNet2DConditionModel.from_pretrained(tmp_path).eval(), cross_attention=True)
        again = shallow(*inputs, feature)
    assert feature.shape[1] == cache_channels(dict(unet.config)) == 32
    torch.testing.assert_close(again, noise, atol=1e-5, rtol=1e-5)


def test_cache_interval_is_checked(tiny_optimized, capsys):
    cases = [(value, ["--cache_interval", value], "a positive integer") for value in ("0", "x", "2.5")]
    with_controlnet = ["--cache_interval", "3", "--controlnet", "c", "--control_image", "i.png"]
    cases.append(("controlnet", with_controlnet, "DeepCache"))
    for name, extra, said in cases:
        assert main(tiny_optimized.tiny(RUN.replace("a_red_star", "x"), *extra)) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and said in error[0], (name, error)
