"""Single-file checkpoints and LoRAs (issue #23): parity with diffusers folders and PyTorch, refusals, rebuilds.

Every file is written here: tiny SDXL models in the single-file layout (``sources.original_layout``), LoRAs in
diffusers/PEFT and kohya layouts (``tests/lora_files.py``), and the headers of other model families.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from lora_files import diffusers_images, write_kohya_lora, write_peft_lora
from PIL import Image
from test_parity import psnr

from sd_utils.sources.original_layout import write_single_file
from stable_diffusion_xl import main

PROMPT = ["--prompt", "a red circle on the left", "--seed", "5", "--num_inference_steps", "4"]


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255


def _only_png(folder: Path) -> Path:
    (png,) = sorted(folder.glob("*.png"))
    return png


@pytest.fixture(scope="module")
def files(tiny_refiner_optimized, tmp_path_factory):
    """The tiny base and refiner as single files, and two LoRAs for the base."""
    root = tmp_path_factory.mktemp("files")
    models = tiny_refiner_optimized.models_dir / "builtin"
    return {
        "base": write_single_file(models / "tiny", root / "tiny base.safetensors"),
        "refiner": write_single_file(models / "tiny-refiner", root / "tiny-refiner.safetensors"),
        "peft": write_peft_lora(models / "tiny", root / "style_peft.safetensors"),
        "kohya": write_kohya_lora(models / "tiny", root / "detail_kohya.safetensors"),
        "kohya_te": write_kohya_lora(models / "tiny", root / "style_kohya_te.safetensors", seed=2, text_encoders=True),
    }


def test_single_file_base_and_refiner_give_the_folders_images(tiny_refiner_optimized, files, tmp_path, caplog):
    """``--model_id FILE --config DIR`` (base; refiner with --base_images) = the same weights as a diffusers folder."""
    work = tiny_refiner_optimized
    builtin = work.models_dir / "builtin"
    runs = {
        "folder": ["--model_id", "tiny"],
        "file": ["--model_id", str(files["base"]), "--config", str(builtin / "tiny")],
    }
    for name, model in runs.items():
        assert main(work.args("--provider", "cpu", *model, *PROMPT, "--output_dir", str(tmp_path / name))) == 0
    assert psnr(_pixels(_only_png(tmp_path / "folder")), _pixels(_only_png(tmp_path / "file"))) >= 60
    base_png = _only_png(tmp_path / "folder")
    refine = ["--base_images", str(base_png), "--strength", "0.5"]
    refiners = {
        "refined-folder": ["--model_id", "tiny-refiner"],
        "refined-file": ["--model_id", str(files["refiner"]), "--config", str(builtin / "tiny-refiner")],
    }
    for name, model in refiners.items():
        args = work.args("--provider", "cpu", *model, *refine, *PROMPT, "--output_dir", str(tmp_path / name))
        assert main(args) == 0
    refined = [_pixels(_only_png(tmp_path / name)) for name in refiners]
    assert psnr(*refined) >= 60
    text = Image.open(_only_png(tmp_path / "file")).text
    sha = __import__("hashlib").sha256(files["base"].read_bytes()).hexdigest()
    assert text["checkpoint"] == "tiny base.safetensors"
    assert text["checkpoint_hash"] == sha[:10]
    assert f"Model hash: {sha[:10]}, Model: tiny base," in text["parameters"]
    # converted once: a second run converts nothing
    caplog.clear()
    with caplog.at_level(logging.INFO):
        args = work.args("--provider", "cpu", *runs["file"], *PROMPT, "--output_dir", str(tmp_path / "again"))
        assert main(args) == 0
    assert "converting" not in caplog.text
    assert "optimizing" not in caplog.text


def test_a_changed_single_file_is_converted_again_and_gets_its_own_build(tiny_optimized, tmp_path, caplog):
    """Converted once per version of the file (by path, size and time); another version replaces the conversion
    and has another build identity (its SHA-256), so its build is made anew."""
    import psutil
    from safetensors.torch import load_file, save_file

    from sd_utils.optimize.recipe import BuildRecipe
    from sd_utils.sources.models import resolve_model

    builtin = tiny_optimized.models_dir / "builtin" / "tiny"
    file = write_single_file(builtin, tmp_path / "model.safetensors")
    models = tmp_path / "models"
    first = resolve_model(str(file), models_dir=models, config=str(builtin))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert resolve_model(str(file), models_dir=models, config=str(builtin)).path == first.path
    assert "converting" not in caplog.text
    other_config = tmp_path / "other_config"  # the same file with other configs: a conversion of its own
    shutil.copytree(builtin, other_config)
    scheduler = other_config / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "timestep_spacing": "trailing"}))
    with caplog.at_level(logging.INFO):
        other = resolve_model(str(file), models_dir=models, config=str(other_config))
    assert other.path != first.path and first.path.exists()  # the file did not change: nothing deleted
    assert "earlier version" not in caplog.text
    dead = max(psutil.pids()) + 10_000  # no process has this pid
    killed = models / "converted" / f".model-0badc0de-{dead}-x1y2"  # a conversion killed mid-way
    killed.mkdir()
    state = load_file(file)
    state["model.diffusion_model.out.2.bias"] += 0.5  # another fine-tune of the same architecture
    save_file(state, str(file))
    with caplog.at_level(logging.INFO):
        second = resolve_model(str(file), models_dir=models, config=str(builtin))
    assert "converted from an earlier version" in caplog.text
    assert second.path != first.path and not first.path.exists() and not killed.exists() and not other.path.exists()
    old_bias = load_file(builtin / "unet" / "diffusion_pytorch_model.safetensors")["conv_out.bias"]
    new_bias = load_file(second.path / "unet" / "diffusion_pytorch_model.safetensors")["conv_out.bias"]
    torch.testing.assert_close(new_bias, old_bias + 0.5)
    assert BuildRecipe.of(second, provider="cpu").digest != BuildRecipe.of(first, provider="cpu").digest


def _fused_options(work, loras: list[tuple[Path, float]]):
    """The options of a tiny run in ``work`` with ``loras`` fused into its build (``--fuse_loras``)."""
    from sd_utils.options import parse_options

    lora_args = [arg for path, scale in loras for arg in ("--lora", f"{path}:{scale}")]
    return parse_options(work.tiny("--prompt x --fuse_loras", *lora_args))


def _build_with(work, loras: list[tuple[Path, float]], caplog) -> tuple[Path, list[str]]:
    """Build tiny with ``loras`` through the app; the optimized folder and the submodels whose workflow ran."""
    from sd_utils import app

    options = _fused_options(work, loras)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sd_utils.optimize.olive_workflow"):
        ready = app.prepare_models(options, app.plan(options))
    ran = [line.split("] ")[1].split(":")[0] for line in caplog.messages if ": convert -> " in line]
    return ready.model.optimized, ran


def test_loras_match_diffusers_and_a_scale_change_rebuilds_only_the_unet(tiny_optimized, tiny_spec, files, caplog):
    """One LoRA (kohya, UNet only), two (PEFT and kohya, both with UNet and text-encoder layers), then another scale
    of the first: ONNX vs diffusers PyTorch with the same LoRAs unfused at the same scales and the same latents
    >= 60 dB, fused (``--fuse_loras``: each build runs the Olive workflows of what its LoRAs change and reuses the
    rest) and at run time on the plain build (which also gives the fused build's images, >= 60 dB)."""
    from sd_utils.runtime.pipeline import load_pipeline
    from sd_utils.runtime.providers import PROVIDERS
    from sd_utils.sources.lora import inspect_lora
    from sd_utils.sources.model_spec import Shape

    latents = torch.randn((1, tiny_spec.latent_channels, 8, 12), generator=torch.Generator().manual_seed(4))
    call = {
        "prompt": "a green star",
        "negative_prompt": "blurry",
        "width": 96,
        "height": 64,
        "num_inference_steps": 3,
        "guidance_scale": 5.0,
        "output_type": "np",
    }
    shape = Shape(batch=1, height=64, width=96)

    def at_run_time(loras):
        """The LoRAs applied at run time on the plain build."""
        components = ("text_encoder", "text_encoder_2", "unet", "vae")
        runtime = load_pipeline(
            tiny_optimized.build().optimized,
            tiny_spec,
            provider=PROVIDERS["cpu"],
            shape=shape,
            model_label="t",
            loras=tuple(inspect_lora(path, scale, components=components) for path, scale in loras),
        )
        return runtime.pipeline(latents=latents.clone(), **call).images

    plain = diffusers_images(tiny_spec.root, [], latents, call)
    cases = [
        ([(files["kohya"], 0.7)], ["unet"]),
        ([(files["peft"], 1.0), (files["kohya_te"], 0.7)], ["text_encoder", "text_encoder_2", "unet"]),
    ]
    for loras, expected_runs in cases:
        folder, ran = _build_with(tiny_optimized, loras, caplog)
        assert ran == expected_runs, loras
        loaded = load_pipeline(folder, tiny_spec, provider=PROVIDERS["cpu"], shape=shape, model_label="t")
        actual = loaded.pipeline(latents=latents.clone(), **call).images
        expected, unfused = diffusers_images(tiny_spec.root, loras, latents, call), at_run_time(loras)
        assert psnr(expected, actual) >= 60 and psnr(expected, unfused) >= 60 and psnr(actual, unfused) >= 60, loras
        assert psnr(plain, actual) < 40  # the LoRA changed the image
        record = json.loads((folder / "build.json").read_text())
        assert [(lora["name"], lora["scale"]) for lora in record["loras"]] == [(p.stem, s) for p, s in loras]
        # fused before export: the graphs and their fusions are the plain model's, op for op
        for submodel in ("unet", "text_encoder_2"):
            assert _op_counts(folder / submodel) == _op_counts(tiny_optimized.build().optimized / submodel)
        # what a build reuses shares the other build's files (hard links), it is no second copy on disk
        reused = folder / "vae_decoder" / "model.onnx"
        assert reused.stat().st_nlink > 1 and reused.stat().st_ino in {
            other.stat().st_ino for other in folder.parent.glob("*/vae_decoder/model.onnx") if other != reused
        }
    # another scale of the first: a build of its own of which only the UNet's workflow would run (not run again here:
    # the first case ran that path); at run time, diffusers' images
    rescaled = [(files["kohya"], 0.4)]
    assert _workflows_to_run(tiny_optimized, rescaled) == ["unet"]
    assert psnr(diffusers_images(tiny_spec.root, rescaled, latents, call), at_run_time(rescaled)) >= 60


def _workflows_to_run(work, loras: list[tuple[Path, float]]) -> list[str]:
    """The submodels whose Olive workflow a ``--fuse_loras`` build with ``loras`` would run: those no other build in
    ``work`` holds as it would make them."""
    from sd_utils import app
    from sd_utils.optimize.olive_workflow import reusable_submodels

    options = _fused_options(work, loras)
    job = app.plan(options)
    recipe, _ = app.build_recipe(options, job.model, job.provider)
    assert not recipe.paths(work.models_dir).optimized.exists()  # a build of its own
    submodels = job.model.spec.submodels
    reused = reusable_submodels(work.models_dir, recipe, submodels)
    return [submodel for submodel in submodels if submodel not in reused]


def _op_counts(submodel_folder: Path) -> dict[str, int]:
    import collections

    import onnx

    graph = onnx.load(str(submodel_folder / "model.onnx"), load_external_data=False).graph
    return dict(collections.Counter(node.op_type for node in graph.node))


def test_lora_metadata_and_window_line(tiny_optimized, files, tmp_path):
    args = tiny_optimized.tiny("--prompt a --seed 1 --num_inference_steps 2", "--output_dir", str(tmp_path))
    assert main([*args, "--lora", f"{files['kohya']}:0.7"]) == 0
    text = Image.open(_only_png(tmp_path)).text
    sha = __import__("hashlib").sha256(files["kohya"].read_bytes()).hexdigest()[:10]
    assert text["loras"] == f"detail_kohya:0.7:{sha}"
    assert text["parameters"].startswith("a <lora:detail_kohya:0.7>\n")
    # A1111's and Civitai's LoRA hash: of the tensor data after the safetensors header, 12 digits
    data = files["kohya"].read_bytes()
    tensors = __import__("hashlib").sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()[:12]
    assert f'Lora hashes: "detail_kohya: {tensors}"' in text["parameters"]


def test_kohya_names_land_on_the_modules_they_name(tiny_optimized, files, tmp_path):
    """The kohya file's ``lora_unet_input_blocks_3_1_…attn1_to_q`` (sgm name) changes exactly diffusers'
    ``down_blocks.1.attentions.0.…attn1.to_q`` by alpha/rank x up @ down x scale."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from sd_utils.optimize.lora_fusion import fuse_loras
    from sd_utils.sources.lora import inspect_lora

    root = tiny_optimized.models_dir / "builtin" / "tiny"
    lora = inspect_lora(files["kohya"], 0.5, components=("text_encoder", "text_encoder_2", "unet", "vae"))
    assert lora.targets == ("unet",)
    fused = fuse_loras(root, (lora,), tmp_path / "fused")
    assert sorted(p.name for p in fused.iterdir() if any(p.glob("*.safetensors"))) == ["unet"]
    before = UNet2DConditionModel.from_pretrained(root / "unet").state_dict()
    after = UNet2DConditionModel.from_pretrained(fused / "unet").state_dict()
    tensors = load_file(files["kohya"])
    stem = "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q"
    down, up = tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"]
    alpha = float(tensors[f"{stem}.alpha"])
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    torch.testing.assert_close(after[key] - before[key], 0.5 * alpha / down.shape[0] * up @ down, atol=1e-5, rtol=1e-4)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(
        name.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")) for name in changed
    )


class _Boom:
    """Unpickling this writes a file: proof that a checkpoint was (not) unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def _header_file(path: Path, keys: dict[str, tuple[int, ...]]) -> Path:
    from safetensors.torch import save_file

    save_file({key: torch.zeros(shape) for key, shape in keys.items()}, str(path))
    return path


REFUSED = {
    "sd15.safetensors": ({"cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 8),
                          "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3)}, "Stable Diffusion 1.x"),
    "sd2.safetensors": ({"cond_stage_model.model.token_embedding.weight": (8, 8),
                         "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3)}, "Stable Diffusion 2.x"),
    "sd3.safetensors": ({"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (8,)},
                        "Stable Diffusion 3"),
    "flux.safetensors": ({"double_blocks.0.img_attn.norm.key_norm.scale": (8,)}, "a Flux model"),
    "odd-unet.safetensors": ({"model.diffusion_model.input_blocks.0.0.weight": (8, 7, 3, 3),
                              "conditioner.embedders.1.model.positional_embedding": (77, 8),
                              "first_stage_model.decoder.conv_in.weight": (8, 4, 3, 3)}, "takes 7 input channels"),
    "lora.safetensors": ({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": (4, 8)}, "is a LoRA, not a model"),
    "unet.safetensors": ({"down_blocks.0.resnets.0.conv1.weight": (8, 8, 3, 3), "conv_in.weight": (8, 4, 3, 3)},
                         "a UNet alone"),
    "pruned.safetensors": ({"model.diffusion_model.label_emb.0.0.weight": (8, 8),
                            "first_stage_model.decoder.conv_in.weight": (8, 4, 3, 3)}, "without its text encoders"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_what_is_not_an_sdxl_file_is_one_line(tiny_optimized, tmp_path, capsys, name):
    keys, said = REFUSED[name]
    path = _header_file(tmp_path / name, keys)
    assert main(tiny_optimized.args("--provider", "cpu", "--model_id", str(path), "--prompt", "x")) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and said in error[0] and str(path) in error[0], error


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "model.bin", "renamed.safetensors"])
def test_pickles_are_refused_without_unpickling(tiny_optimized, tmp_path, capsys, name):
    marker = tmp_path / "marker"
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"state_dict": _Boom(marker)}))
    for option in ("--model_id", "--lora"):
        extra = [option, str(path)] if option == "--model_id" else ["--model_id", "tiny", "--lora", str(path)]
        assert main(tiny_optimized.args("--provider", "cpu", *extra, "--prompt", "x")) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and str(path) in error[0] and ".safetensors" in error[0], error
    assert not marker.exists()


def test_loras_that_do_not_fit_are_one_line(tiny_refiner_optimized, files, tmp_path, capsys):
    work = tiny_refiner_optimized
    wrong_size = tmp_path / "other_base.safetensors"
    write_kohya_lora(work.models_dir / "builtin" / "tiny-refiner", wrong_size)  # the refiner's UNet: other widths
    cases = [
        (["--model_id", "tiny-refiner", "--lora", str(files["peft"])], "text_encoder, which the model has not"),
        (["--model_id", "tiny", "--lora", str(wrong_size)], "does not fit the model"),
        (["--model_id", "tiny", "--lora", str(files["base"])], "it is a model checkpoint: pass it as --model_id"),
        (["--model_id", "tiny", "--lora", str(tmp_path / "missing.safetensors")], "no such file"),
        (["--model_id", "tiny", "--lora", f"{files['kohya']}:nan"], "LoRA scale"),
    ]
    for extra, said in cases:
        assert main(work.args("--provider", "cpu", *extra, "--prompt", "x")) == 2, extra
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and said in error[0], (extra, error)


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fake_hub_repo(hub: Path, repo: str) -> Path:
    """A repository in a Hugging Face cache folder, as an offline machine that downloaded it before has it."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    return folder / "snapshots" / COMMIT


@pytest.fixture(scope="module")
def hub(tiny_optimized, tmp_path_factory):
    """A Hugging Face cache with ``acme/tiny-xl`` (plain fp32 and fp16-variant weights) and ``acme/pickles`` (.bin)."""
    import shutil

    from diffusers import StableDiffusionXLPipeline

    hub = tmp_path_factory.mktemp("hub")
    builtin = tiny_optimized.models_dir / "builtin" / "tiny"
    snapshot = _fake_hub_repo(hub, "acme/tiny-xl")
    shutil.copytree(builtin, snapshot)
    pipeline = StableDiffusionXLPipeline.from_pretrained(builtin)
    pipeline.to(torch.float16).save_pretrained(snapshot, variant="fp16")
    pickles = _fake_hub_repo(hub, "acme/pickles")
    shutil.copytree(builtin, pickles, ignore=shutil.ignore_patterns("*.safetensors"))
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        (pickles / component / "pytorch_model.bin").write_bytes(b"not read")
    return hub


@pytest.fixture
def in_hub(hub, monkeypatch):
    """The Hugging Face cache of :func:`hub` as this process's (as ``HF_HUB_CACHE`` sets it; the hub stays offline)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    return hub


@pytest.mark.parametrize(("variant", "dtype"), [("", torch.float16), ("fp32", torch.float32)])
def test_hub_models_use_the_fp16_variant_unless_told(in_hub, tmp_path, variant, dtype):
    from sd_utils.optimize.export_models import stored_dtype
    from sd_utils.sources.models import resolve_model

    model = resolve_model("acme/tiny-xl", models_dir=tmp_path / "models", variant=variant or None)
    assert [stored_dtype(model.path / "unet"), stored_dtype(model.path / "text_encoder_2")] == [dtype, dtype]


def test_hub_repositories_without_safetensors_or_the_variant_are_one_line(in_hub, tmp_path, capsys):
    cases = [
        (["--model_id", "acme/pickles"], "has only pickled weights (.bin)"),
        (["--model_id", "acme/tiny-xl", "--variant", "bf16"], "--variant bf16: acme/tiny-xl has no bf16"),
    ]
    for extra, said in cases:
        code = main([*extra, "--models_dir", str(tmp_path), "--provider", "cpu", "--prompt", "x"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and said in lines[0], (extra, lines)


def test_a_unet_file_replaces_the_models_unet_and_reuses_the_rest(tiny_refiner_optimized, tiny_spec, tmp_path, caplog):
    """``--unet FILE`` (diffusers layout, as SDXL-Lightning's UNet-only files): only the UNet workflow runs, and the
    images are diffusers' with that UNet; a UNet of another architecture is one line."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file, save_file

    from sd_utils import app
    from sd_utils.options import parse_options
    from sd_utils.runtime.pipeline import load_pipeline
    from sd_utils.runtime.providers import PROVIDERS
    from sd_utils.sources.model_spec import Shape

    work = tiny_refiner_optimized
    state = load_file(tiny_spec.root / "unet" / "diffusion_pytorch_model.safetensors")
    generator = torch.Generator().manual_seed(9)
    state = {key: value + 0.02 * torch.randn(value.shape, generator=generator) for key, value in state.items()}
    unet_file = tmp_path / "lightning_unet.safetensors"
    save_file(state, str(unet_file))
    options = parse_options(work.tiny("--prompt x", "--unet", str(unet_file)))
    with caplog.at_level(logging.INFO, logger="sd_utils.optimize.olive_workflow"):
        ready = app.prepare_models(options, app.plan(options))
    assert [line.split("] ")[1].split(":")[0] for line in caplog.messages if ": convert -> " in line] == ["unet"]
    latents = torch.randn((1, tiny_spec.latent_channels, 8, 8), generator=torch.Generator().manual_seed(2))
    call = {"prompt": "a star", "width": 64, "height": 64, "num_inference_steps": 3, "output_type": "np"}
    loaded = load_pipeline(
        ready.model.optimized,
        tiny_spec,
        provider=PROVIDERS["cpu"],
        shape=Shape(batch=1, height=64, width=64),
        model_label="t",
    )
    actual = loaded.pipeline(latents=latents.clone(), **call).images
    reference = StableDiffusionXLPipeline.from_pretrained(tiny_spec.root, torch_dtype=torch.float32)
    reference.unet.load_state_dict(state)
    assert psnr(reference(latents=latents.clone(), **call).images, actual) >= 60
    refiner_unet = work.models_dir / "builtin" / "tiny-refiner" / "unet" / "diffusion_pytorch_model.safetensors"
    assert main(work.args("--provider", "cpu", "--model_id", "tiny", "--unet", str(refiner_unet), *PROMPT)) == 2


def _tiny_inpainting_folder(tiny_root: Path, destination: Path) -> Path:
    """The tiny base with a 9-channel inpainting UNet (its conv_in widened, deterministic weights), as a folder."""
    import shutil

    from diffusers import UNet2DConditionModel

    shutil.copytree(tiny_root, destination)
    unet = UNet2DConditionModel.from_pretrained(destination / "unet")
    torch.manual_seed(21)
    wide = UNet2DConditionModel.from_config({**unet.config, "in_channels": 9})
    state = unet.state_dict()
    state["conv_in.weight"] = torch.cat([state["conv_in.weight"], wide.conv_in.weight[:, 4:].detach()], dim=1)
    wide.load_state_dict(state)
    shutil.rmtree(destination / "unet")
    wide.save_pretrained(destination / "unet")
    index = json.loads((destination / "model_index.json").read_text())
    (destination / "model_index.json").write_text(
        json.dumps({**index, "_class_name": "StableDiffusionXLInpaintPipeline"})
    )
    return destination


def test_a_single_file_inpainting_checkpoint_matches_diffusers(tiny_optimized, tmp_path, capsys):
    """A 9-channel SDXL inpainting checkpoint as a single file: the PNG equals diffusers' StableDiffusionXLInpaint
    pipeline on the same weights, image, mask, strength and seed; text-to-image with it is one line."""
    from diffusers import StableDiffusionXLInpaintPipeline

    folder = _tiny_inpainting_folder(tiny_optimized.models_dir / "builtin" / "tiny", tmp_path / "tiny-inpainting")
    file = write_single_file(folder, tmp_path / "tiny-inpainting.safetensors")
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 96, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (48, 0, 96, 64))
    mask.save(tmp_path / "mask.png")
    model = ["--model_id", str(file), "--config", str(folder), "--provider", "cpu", "--seed", "8"]
    inputs = ["--base_images", str(tmp_path / "image.png"), "--mask_image", str(tmp_path / "mask.png")]
    run = [*model, *inputs, "--prompt", "a red circle", "--num_inference_steps", "5", "--strength", "0.8"]
    assert main(tiny_optimized.args(*run, "--output_dir", str(tmp_path / "out"))) == 0
    reference = StableDiffusionXLInpaintPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    expected = reference(
        prompt="a red circle", image=image, mask_image=mask, strength=0.8, num_inference_steps=5, guidance_scale=5.0,
        height=64, width=96, output_type="np", generator=[torch.Generator().manual_seed(8)],
    ).images[0]  # fmt: skip
    assert psnr(np.round(expected * 255) / 255, _pixels(_only_png(tmp_path / "out"))) >= 60
    capsys.readouterr()
    assert main(tiny_optimized.args(*model, "--prompt", "x")) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "is an inpainting model" in error[0] and "--mask_image" in error[0]
