"""The Olive configs are pure data; one pure function adapts them to a provider (table-driven over all cases)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import json
import logging
import re
from pathlib import Path

import pytest
from olive.hardware import AcceleratorSpec

from sd_utils.errors import OptimizationError
from sd_utils.optimize import olive_passes
from sd_utils.optimize.olive_workflow import PROJECT_DIR, load_template, unsupported_fusions, workflow_config
from sd_utils.runtime.providers import PROVIDERS
from sd_utils.sources.builder import ARCHITECTURES, materialize
from sd_utils.sources.model_spec import SUBMODELS, ModelSpec

MODEL_TYPES = {
    "text_encoder": "clip",
    "text_encoder_2": "clip",
    "unet": "unet",
    "vae_encoder": "vae",
    "vae_decoder": "vae",
}
GPU_ONLY_FUSIONS = (
    "enable_nhwc_conv",
    "enable_group_norm",
    "enable_skip_group_norm",
    "enable_bias_splitgelu",
    "enable_packed_qkv",
    "enable_packed_kv",
    "enable_bias_add",
)


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    root = tmp_path_factory.mktemp("m")
    return {
        name: ModelSpec.from_folder(materialize(ARCHITECTURES[name], root / name)) for name in ("tiny", "tiny-refiner")
    }


@pytest.fixture(scope="module")
def spec(specs):
    return specs["tiny"]


CASES = [
    (variant, submodel, provider)
    for variant in ("tiny", "tiny-refiner")
    for submodel in SUBMODELS
    for provider in sorted(PROVIDERS)
    if not (variant == "tiny-refiner" and submodel == "text_encoder")
]


def _config(submodel: str, provider: str, spec) -> dict:
    return workflow_config(
        load_template(submodel),
        submodel=submodel,
        provider=PROVIDERS[provider],
        model_path=spec.root,
        disabled_fusions=unsupported_fusions(spec, provider=PROVIDERS[provider], submodel=submodel),
        cache_dir=Path("/cache"),
        output_dir=Path("/out"),
    )


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
@pytest.mark.parametrize("submodel", SUBMODELS)
def test_config_for_provider(spec, submodel, provider):
    row = PROVIDERS[provider]
    template = load_template(submodel)
    pristine = copy.deepcopy(template)
    config = workflow_config(
        template, submodel=submodel, provider=row, model_path=spec.root, cache_dir=Path("/c"), output_dir=Path("/o")
    )
    assert template == pristine, "the template must not be modified"
    assert list(config["passes"]) == ["convert", row.optimize_pass]
    convert, optimize = config["passes"].values()
    assert convert["type"] == "StreamingOnnxConversion"  # weights streamed: see sd_utils/optimize/olive_passes.py
    assert convert["torch_dtype"] == "float32"
    assert convert["target_opset"] >= 17
    assert not convert.get("use_dynamo_exporter", False)  # TorchScript exporter: the fusions expect its graphs
    assert optimize["type"] == "StreamingTransformersOptimization"
    assert optimize["model_type"] == MODEL_TYPES[submodel]
    assert optimize["opt_level"] == 0
    # SDXL's VAE overflows fp16 (black images): the encoder stays fp32, the decoder is fp16 on GPU providers but for
    # an fp32 island from its last upsampler on (where Olive's DirectML example kept it fp32 too)
    assert optimize["float16"] is (row.fp16 and submodel != "vae_encoder")
    if submodel == "vae_decoder" and row.fp16:
        assert optimize["force_fp32_from"] == ["/decoder/up_blocks.2/upsamplers.0/conv/Conv"]
    else:
        assert "force_fp32_from" not in optimize
    assert optimize["use_gpu"] is row.fp16
    accelerators = config["systems"][config["target"]]["accelerators"]
    assert accelerators == [{"device": row.olive_device, "execution_providers": [row.execution_provider]}]
    assert config["input_model"]["model_path"] == str(spec.root)
    assert config["input_model"]["model_loader"] == f"{submodel}_load"
    assert Path(config["input_model"]["model_script"]) == PROJECT_DIR / "user_script.py"
    options = optimize["optimization_options"]
    if provider == "cpu":
        assert not any(options[name] for name in GPU_ONLY_FUSIONS), "CPU has no kernels for these fusions"
    if optimize["float16"]:
        assert optimize["keep_io_types"] is True
        assert "RandomNormalLike" in optimize["force_fp32_ops"]
    if provider == "dml":
        assert not options["enable_nhwc_conv"] and not options["enable_bias_splitgelu"]
        assert not options["enable_skip_layer_norm"] and not options["enable_bias_add"]
        assert options["enable_packed_qkv"] and options["enable_packed_kv"]
        assert options["group_norm_channels_last"] is False
    if provider == "cuda" and submodel == "unet":
        # measured on the H100: unpacked, self-attention becomes ORT's Attention op and the step slower (bench/NOTES.md)
        assert options["enable_packed_qkv"] and options["enable_packed_kv"]
    if submodel == "unet":
        assert convert["save_as_external_data"] and optimize["save_as_external_data"]
    if submodel.startswith("text_encoder"):
        # shape inference costs 16 GB on the real text_encoder_2 and fuses nothing more there (bench/NOTES.md)
        assert options["enable_shape_inference"] is False
    if submodel.startswith("vae"):
        # ORT 1.32's FusionAttentionVae zeroes the q/k/v biases of the fused node (see tests/test_parity.py)
        assert options["enable_attention"] is False


@contextlib.contextmanager
def _olive_warnings():
    """Collect the warnings Olive logs (its logger does not propagate to pytest's caplog)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("olive")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize(("variant", "submodel", "provider"), CASES)
def test_config_validates_against_olives_schema(specs, variant, submodel, provider):
    """Every provider x submodel x base/refiner: the patched config is a valid Olive run config."""
    from olive.workflows.run.config import RunConfig

    assert submodel in specs[variant].submodels
    run_config = RunConfig.parse_file_or_obj(_config(submodel, provider, specs[variant]))  # rearranges its input
    assert list(run_config.passes) == ["convert", PROVIDERS[provider].optimize_pass]
    # each pass's options against the pass's own schema (Olive only warns about unknown keys, and ignores them)
    row = PROVIDERS[provider]
    accelerator = AcceleratorSpec(accelerator_type=row.olive_device, execution_provider=row.execution_provider)
    package = olive_passes.package_config()["passes"]
    for options in _config(submodel, provider, specs[variant])["passes"].values():
        module, name = package[options.pop("type")]["module_path"].rsplit(".", 1)
        pass_class = getattr(importlib.import_module(module), name)
        with _olive_warnings() as warned:
            pass_class.generate_config(accelerator, options)
        assert not warned, warned


def test_missing_pass_is_a_clear_error(spec):
    template = load_template("unet")
    del template["passes"]["optimize_dml"]
    with pytest.raises(OptimizationError, match=re.escape("config_unet.json has no 'optimize_dml' pass")):
        workflow_config(
            template,
            submodel="unet",
            provider=PROVIDERS["dml"],
            model_path=spec.root,
            cache_dir=Path("/c"),
            output_dir=Path("/o"),
        )


def test_configs_are_pure_data():
    for submodel in SUBMODELS:
        text = (PROJECT_DIR / f"config_{submodel}.json").read_text()
        config = json.loads(text)
        assert "model_path" not in config["input_model"], "paths are filled in at run time"
        assert set(config["passes"]) == {"convert", "optimize_cpu", "optimize_dml", "optimize_cuda"}
    assert (PROJECT_DIR / "config_safety_checker.json").is_file()


def test_cuda_fusions_follow_the_kernels_limits(spec):
    """ORT's CUDA BiasSplitGelu runs only SDXL-sized GEGLU widths: the tiny UNet (64 channels) must not use it, the
    real SDXL base (640, 1280 channels) must."""
    tiny = _config("unet", "cuda", spec)["passes"]["optimize_cuda"]["optimization_options"]
    assert tiny["enable_bias_splitgelu"] is False
    real = dataclasses.replace(spec, attention_channels=(640, 1280))
    full = _config("unet", "cuda", real)["passes"]["optimize_cuda"]["optimization_options"]
    assert full["enable_bias_splitgelu"] is True
    assert (
        _config("unet", "dml", spec)["passes"]["optimize_dml"]["optimization_options"]["enable_bias_splitgelu"] is False
    )


def test_cuda_group_norm_fusion_needs_even_channels_per_group(spec):
    """The tiny VAE has 8 channels in 8 groups: ORT's CUDA GroupNorm refuses that, so the VAE keeps it unfused."""
    assert 1 in spec.group_norm_sizes["vae"]
    vae = _config("vae_decoder", "cuda", spec)["passes"]["optimize_cuda"]["optimization_options"]
    assert vae["enable_group_norm"] is False and vae["enable_skip_group_norm"] is False
    unet = _config("unet", "cuda", spec)["passes"]["optimize_cuda"]["optimization_options"]
    assert unet["enable_group_norm"] is True  # 32 and 64 channels in 16 groups


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_fp16_fixed_vae_switches_the_vae_to_fp16_on_gpu_only(spec, provider):
    row = PROVIDERS[provider]
    for submodel in ("vae_encoder", "vae_decoder"):
        config = workflow_config(
            load_template(submodel),
            submodel=submodel,
            provider=row,
            model_path=spec.root,
            cache_dir=Path("/c"),
            output_dir=Path("/o"),
            vae_float16=True,
        )
        optimize = config["passes"][row.optimize_pass]
        assert optimize["float16"] is row.fp16
        assert "force_fp32_from" not in optimize  # the fixed VAE needs no fp32 island
        if row.fp16:
            assert optimize["keep_io_types"] is True


def test_staging_folders_of_killed_runs_are_deleted(tmp_path):
    """A run killed mid-way (no clean-up ran) leaves its staging folder, tens of GB at full size; the next run deletes
    it, but never a live process's folder or a folder it cannot attribute."""
    import os

    from sd_utils.optimize.olive_workflow import staging_folder

    dead = tmp_path / ".optimize-999999999-abc"  # no such process
    (dead / "olive").mkdir(parents=True)
    (dead / "olive" / "model.onnx.data").write_bytes(b"x")
    live = tmp_path / f".optimize-checker-{os.getpid()}-def"
    unknown = tmp_path / ".optimize-old"
    live.mkdir()
    unknown.mkdir()
    new = staging_folder(tmp_path)
    assert new.name.startswith(f".optimize-{os.getpid()}-")
    assert not dead.exists()
    assert live.exists() and unknown.exists()


def test_olives_cache_key_holds_the_code_not_the_project_folder(spec):
    """Olive hashes every file under ``script_dir`` into its cache key: the project folder (virtual environment,
    models, outputs) cost minutes per submodel. The export pass's ``code_digest`` keys the cache by the code."""
    config = _config("unet", "cpu", spec)
    assert "script_dir" not in config["input_model"]
    accelerator = AcceleratorSpec(accelerator_type="cpu", execution_provider="CPUExecutionProvider")
    option = olive_passes.StreamingOnnxConversion._default_config(accelerator)["code_digest"]
    assert option.default_value == olive_passes.code_digest() and len(option.default_value) == 16
