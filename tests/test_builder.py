"""Built-in models: deterministic bytes, the published SDXL sizes, and specs read from the configs alone."""

from __future__ import annotations

import hashlib

import pytest
import torch

from sd_utils.sources.builder import ARCHITECTURES, materialize
from sd_utils.sources.model_spec import ModelSpec, Shape, free_dimension_overrides, submodel_io


def _digest(folder) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize("name", ["tiny", "tiny-refiner"])
def test_materialize_is_byte_for_byte_deterministic(tmp_path, name):
    first = _digest(materialize(ARCHITECTURES[name], tmp_path / "a"))
    second = _digest(materialize(ARCHITECTURES[name], tmp_path / "b"))
    assert first == second
    assert "unet/diffusion_pytorch_model.safetensors" in first


def test_full_size_configs_have_the_published_parameter_counts():
    """stabilityai/stable-diffusion-xl-base-1.0: UNet 2,567,463,684; VAE 83,653,863; CLIP-L 123,060,480;
    OpenCLIP bigG text + projection 694,659,840 (counted on the meta device: no memory used)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def count(module) -> int:
        return sum(parameter.numel() for parameter in module.parameters())

    base = ARCHITECTURES["random-sdxl-base"]
    with torch.device("meta"):
        assert count(UNet2DConditionModel(**base.unet)) == 2_567_463_684
        assert count(AutoencoderKL(**base.vae)) == 83_653_863
        assert count(CLIPTextModel(CLIPTextConfig(**base.text_encoder.config()))) == 123_060_480
        assert count(CLIPTextModelWithProjection(CLIPTextConfig(**base.text_encoder_2.config()))) == 694_659_840
        refiner = ARCHITECTURES["random-sdxl-refiner"]
        assert count(UNet2DConditionModel(**refiner.unet)) == 2_259_526_660


def test_full_size_base_unet_config_matches_the_hub():
    unet = ARCHITECTURES["random-sdxl-base"].unet
    assert unet["projection_class_embeddings_input_dim"] == 2816
    assert unet["cross_attention_dim"] == 2048
    assert unet["transformer_layers_per_block"] == [1, 2, 10]
    assert ARCHITECTURES["random-sdxl-refiner"].unet["projection_class_embeddings_input_dim"] == 2560


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    root = tmp_path_factory.mktemp("builtin")
    return {
        name: ModelSpec.from_folder(materialize(ARCHITECTURES[name], root / name))
        for name in ARCHITECTURES
        if name.startswith("tiny")
    }


def test_spec_of_the_tiny_base(specs):
    spec = specs["tiny"]
    assert spec.submodels == ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder")
    assert not spec.is_refiner
    assert spec.time_ids_width == 6
    assert spec.cross_attention_dim == 64  # both encoders' widths concatenated
    assert spec.pooled_dim == 32
    assert spec.vae_scale_factor == 8
    assert spec.size_multiple == 16
    assert spec.text_length == 77
    assert spec.default_image_size == 128
    assert spec.scaling_factor == 0.13025


def test_spec_of_the_tiny_refiner_comes_from_its_configs(specs):
    spec = specs["tiny-refiner"]
    assert spec.is_refiner
    assert spec.submodels == ("text_encoder_2", "unet", "vae_encoder", "vae_decoder")
    assert spec.time_ids_width == 5  # original size, crop, aesthetic score
    assert spec.cross_attention_dim == 32  # text_encoder_2 alone
    assert spec.requires_aesthetics_score
    assert spec.size_multiple == 32


def test_io_contracts_follow_the_spec(specs):
    spec = specs["tiny-refiner"]
    unet = submodel_io(spec, "unet")
    sample, timestep, hidden, text_embeds, time_ids = unet.dummy_inputs(Shape(batch=1, height=64, width=96))
    assert sample.shape == (2, 4, 8, 12)  # classifier-free guidance doubles the batch
    assert timestep.shape == ()
    assert hidden.shape == (2, 77, 32)
    assert text_embeds.shape == (2, 32)
    assert time_ids.shape == (2, 5)
    encoder = submodel_io(spec, "text_encoder_2")
    assert encoder.output_names[:2] == ("text_embeds", "last_hidden_state")
    assert encoder.output_names[-1] == f"hidden_states.{spec.text_num_layers['text_encoder_2']}"


def test_free_dimension_overrides_pin_every_dim(specs):
    spec = specs["tiny"]
    overrides = free_dimension_overrides(spec, Shape(batch=3, height=64, width=128, classifier_free_guidance=False))
    assert overrides["unet_sample_batch"] == 3
    assert overrides["unet_sample_height"] == 8
    assert overrides["unet_sample_width"] == 16
    assert overrides["text_encoder_sequence"] == overrides["text_encoder_2_sequence"] == 77
    assert overrides["vae_decoder_height"] == 8
    assert overrides["vae_encoder_width"] == 128
    assert overrides["vae_encoder_batch"] == 1  # diffusers encodes image by image with per-image generators
    for name in spec.submodels:
        contract = submodel_io(spec, name)
        for input_name in contract.input_names:
            for dim in contract.dynamic_axes.get(input_name, {}).values():
                assert dim in overrides, f"{name}.{input_name} dim {dim} is not pinned"
                assert dim.startswith(name + "_")


def test_a_build_from_older_shipped_weights_is_rebuilt(tmp_path):
    """Updating the project (new demo weights) must not leave the old build, or its optimized models, in use."""
    import json

    from sd_utils.sources.builder import BUILD_RECORD, build_record, folder_format, weights_fingerprint
    from sd_utils.sources.models import resolve_model

    folder = resolve_model("demo", models_dir=tmp_path).path
    current = weights_fingerprint(ARCHITECTURES["demo"])
    assert build_record(folder) == {
        "architecture": "demo",
        "weights": current,
        "format": folder_format(ARCHITECTURES["demo"]),
    }
    assert weights_fingerprint(ARCHITECTURES["tiny"]) is None  # random weights: nothing to go stale

    (folder / BUILD_RECORD).write_text(json.dumps({"architecture": "demo", "weights": "older"}), encoding="utf-8")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"old weights")
    assert resolve_model("demo", models_dir=tmp_path).path == folder
    assert build_record(folder)["weights"] == current
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size > 1000
