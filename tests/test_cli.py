"""The real CLI, in process: optimize once, generate, and the errors users meet (one line, exit code, nothing lost)."""

from __future__ import annotations

import collections
import json
import re
import shutil

import onnx
import pytest
from PIL import Image

from sd_utils.errors import OptimizationError
from sd_utils.optimize import olive_workflow
from stable_diffusion_xl import main
from tests.conftest import Workspace

SUBMODEL_FOLDERS = ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder")


def _com_microsoft_ops(path) -> collections.Counter:
    graph = onnx.load(str(path), load_external_data=False).graph
    return collections.Counter(node.op_type for node in graph.node if node.domain == "com.microsoft")


def test_optimize_writes_optimum_loadable_folders(tiny_optimized):
    for variant in ("optimized", "unoptimized"):
        folder = getattr(tiny_optimized.build(), variant)
        for component in (*SUBMODEL_FOLDERS, "scheduler", "tokenizer", "tokenizer_2"):
            assert (folder / component).is_dir(), f"{variant} lacks {component}"
        for submodel in SUBMODEL_FOLDERS:
            assert (folder / submodel / "model.onnx").is_file()
            assert (folder / submodel / "config.json").is_file()
        assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    # nothing is left of the staging area
    assert not [p for p in tiny_optimized.models_dir.iterdir() if p.name.startswith(".")]


def test_optimized_unet_has_the_cpu_fusions(tiny_optimized):
    optimized = _com_microsoft_ops(tiny_optimized.build().optimized / "unet/model.onnx")
    unoptimized = _com_microsoft_ops(tiny_optimized.build().unoptimized / "unet/model.onnx")
    assert unoptimized == collections.Counter()
    # every transformer block's self-attention fuses to Attention and its cross-attention to MultiHeadAttention
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention import BasicTransformerBlock

    unet = UNet2DConditionModel.from_pretrained(tiny_optimized.models_dir / "builtin/tiny/unet")
    blocks = sum(isinstance(module, BasicTransformerBlock) for module in unet.modules())
    assert blocks > 0
    assert optimized["Attention"] == blocks
    assert optimized["MultiHeadAttention"] == blocks
    assert optimized["SkipLayerNormalization"] >= 2 * blocks
    # CPU kernels only: no GPU-only ops
    assert not {"NhwcConv", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd"} & set(optimized)
    for encoder in ("text_encoder", "text_encoder_2"):
        fused = _com_microsoft_ops(tiny_optimized.build().optimized / encoder / "model.onnx")
        assert fused["SkipLayerNormalization"] > 0


def test_generate_three_images_in_batches_of_two(tiny_optimized, tmp_path, capsys):
    out = tmp_path / "out"
    options = "--num_images 3 --batch_size 2 --num_inference_steps 3 --seed 100 --width 96 --height 64"
    code = main(
        tiny_optimized.tiny(options, "--prompt", "a blue square", "--negative_prompt", "red", "--output_dir", str(out))
    )
    assert code == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["00000-100.png", "00001-101.png", "00002-102.png"]
    printed = capsys.readouterr().out
    assert all(f"Generated {f}" in printed for f in files)
    image = Image.open(files[1])
    assert image.size == (96, 64)
    assert image.text["prompt"] == "a blue square"
    assert image.text["negative_prompt"] == "red"
    assert image.text["seed"] == "101"
    assert image.text["num_inference_steps"] == "3"
    assert image.text["guidance_scale"] == "5.0"
    assert (image.text["width"], image.text["height"]) == ("96", "64")
    assert image.text["model"] == "tiny"
    assert image.text["provider"] == "cpu"


def test_second_run_never_overwrites(tiny_optimized, tmp_path):
    args = tiny_optimized.tiny("--prompt x --seed 5 --num_inference_steps 2 --output_dir", str(tmp_path))
    assert main(args) == 0
    first = (tmp_path / "00000-5.png").read_bytes()
    assert main(args) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000-5.png", "00001-5.png"]
    assert (tmp_path / "00000-5.png").read_bytes() == first
    # same seed, same image: the run is deterministic
    assert (tmp_path / "00001-5.png").read_bytes() == first


def test_unoptimized_and_dynamic_dims_generate(tiny_optimized, tmp_path):
    options = "--prompt x --seed 1 --num_inference_steps 2 --test_unoptimized --dynamic_dims --num_images 3"
    code = main(tiny_optimized.tiny(options, "--batch_size", "2", "--output_dir", str(tmp_path)))
    assert code == 0
    assert len(list(tmp_path.glob("*.png"))) == 3
    assert Image.open(next(tmp_path.glob("*.png"))).text["model"] == "tiny (unoptimized)"


def test_failed_optimization_keeps_the_previous_model(tiny_optimized, monkeypatch, capsys):
    optimized = tiny_optimized.build().optimized
    before = {p.relative_to(optimized): p.stat().st_mtime_ns for p in optimized.rglob("*")}

    def failing_run(config, *, submodel, **options):
        if submodel == "unet":
            raise OptimizationError("Olive produced no orttransformersoptimization model for unet")
        return original(config, submodel=submodel, **options)

    original = olive_workflow.run_submodel
    monkeypatch.setattr(olive_workflow, "run_submodel", failing_run)
    code = main(tiny_optimized.tiny("--optimize"))
    assert code == OptimizationError.exit_code
    assert "error: Olive produced no orttransformersoptimization model for unet" in capsys.readouterr().err
    assert {p.relative_to(optimized): p.stat().st_mtime_ns for p in optimized.rglob("*")} == before
    assert not [p for p in tiny_optimized.models_dir.iterdir() if p.name.startswith(".")]


def test_rerun_uses_the_olive_cache_and_swaps(tiny_optimized, capsys):
    optimized = tiny_optimized.build().optimized
    old_inode = optimized.stat().st_ino
    assert main(tiny_optimized.tiny("--optimize")) == 0
    assert optimized.stat().st_ino != old_inode  # a new folder was swapped in
    assert (optimized / "unet" / "model.onnx").is_file()
    assert f"Optimized model: {optimized}" in capsys.readouterr().out


def test_clean_cache_moves_the_results_out_and_leaves_no_cache(tiny_optimized, tmp_path):
    """--clean_cache: both folders complete and loadable by onnx (no file shares its data with a cache: onnx refuses
    hard-linked external data), and no Olive cache left behind to hold a second copy of the weights."""
    from sd_utils.optimize.olive_workflow import external_data_files

    models, cache = tmp_path / "models", tmp_path / "cache"
    shutil.copytree(tiny_optimized.models_dir / "builtin", models / "builtin")
    args = ["--optimize", "--model_id", "tiny", "--provider", "cpu", "--clean_cache"]
    assert main([*args, "--models_dir", str(models), "--cache_dir", str(cache)]) == 0
    assert not cache.exists()
    for kind in ("unoptimized", "optimized"):
        onnx_file = getattr(Workspace(models, cache).build(), kind) / "unet" / "model.onnx"
        data = [onnx_file.parent / name for name in external_data_files(onnx_file)]
        assert data and all(path.stat().st_nlink == 1 for path in data)
        onnx.load(str(onnx_file))  # reads the external data


def test_a_build_records_its_recipe_and_another_recipe_is_not_current(tiny_optimized):
    """build.json says what went into a build; a folder whose record is of another recipe (other weights, another
    VAE or provider, an older layout) or that has none is not current, so it is rebuilt, never used."""
    import json

    from sd_utils.optimize.recipe import BUILD_FILE, BuildRecipe
    from sd_utils.sources.models import resolve_model

    model = resolve_model("tiny", models_dir=tiny_optimized.models_dir)
    recipe = BuildRecipe.of(model, provider="cpu")
    paths = recipe.paths(tiny_optimized.models_dir)
    assert paths.optimized.name == f"tiny-{recipe.digest}"
    record = json.loads((paths.optimized / BUILD_FILE).read_text(encoding="utf-8"))
    assert record["source"]["kind"] == "builtin" and record["provider"] == "cpu" and record["optimized"] is True
    assert recipe.is_current(paths.optimized) and recipe.is_current(paths.unoptimized)
    assert BuildRecipe.of(model, provider="cuda").digest != recipe.digest
    assert BuildRecipe.of(model, provider="cpu", vae="some/vae").digest != recipe.digest
    older = BuildRecipe(name="tiny", source={**recipe.source, "weights": "older"}, vae=None, provider="cpu")
    assert not older.is_current(paths.optimized)
    assert not recipe.is_current(paths.optimized.parent / "missing")


def test_same_name_folders_get_their_own_builds(tiny_optimized, tmp_path, caplog):
    """Two local model folders that share a name (A/model, B/model) are two builds: each draws its own pixels and
    names itself in the PNG; an unchanged folder reuses its build, a changed one's build is no longer current (so it
    is rebuilt, as B's was built); the folder an older sdxl-olive made under the bare name is never used."""
    import logging

    import numpy as np
    from safetensors.torch import load_file, save_file

    from sd_utils.optimize.recipe import BuildRecipe
    from sd_utils.sources.models import resolve_model

    models, cache = tmp_path / "models", tiny_optimized.cache_dir
    sources = {}
    for name in ("A", "B"):
        sources[name] = tmp_path / name / "model"
        shutil.copytree(tiny_optimized.models_dir / "builtin" / "tiny", sources[name])
        (sources[name] / "sdxl_olive_builtin.json").unlink()
    weights = sources["B"] / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({key: value * 1.5 for key, value in load_file(weights).items()}, weights)
    legacy = models / "optimized" / "model"
    legacy.mkdir(parents=True)
    (legacy / "sdxl_olive.json").write_text("{}", encoding="utf-8")
    caplog.set_level(logging.INFO)

    def draw(name: str) -> tuple[np.ndarray, str]:
        out = tmp_path / f"out-{name}-{len(list(tmp_path.glob('out-*')))}"
        args = ["--model_id", str(sources[name]), "--provider", "cpu", "--prompt", "x", "--seed", "3"]
        args += ["--num_inference_steps", "2", "--models_dir", str(models), "--cache_dir", str(cache)]
        assert main([*args, "--output_dir", str(out)]) == 0
        (png,) = out.glob("*.png")
        image = Image.open(png)
        return np.asarray(image), image.text["model"]

    a_pixels, a_model = draw("A")
    assert f"{legacy} was made by an older sdxl-olive and is not reused" in caplog.text
    b_pixels, b_model = draw("B")
    assert not np.array_equal(a_pixels, b_pixels)
    assert (a_model, b_model) == (str(sources["A"]), str(sources["B"]))
    builds = sorted(p.name for p in (models / "optimized").iterdir() if p.name.startswith("model-"))
    assert len(builds) == 2
    caplog.clear()
    assert np.array_equal(draw("A")[0], a_pixels)  # unchanged: its build is reused
    assert "optimizing" not in caplog.text
    recipe = BuildRecipe.of(resolve_model(str(sources["A"]), models_dir=models), provider="cpu")
    assert recipe.is_current(recipe.paths(models).optimized)
    weights = sources["A"] / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({key: value * 0.5 for key, value in load_file(weights).items()}, weights)
    changed = BuildRecipe.of(resolve_model(str(sources["A"]), models_dir=models), provider="cpu")
    assert changed.digest != recipe.digest and not changed.is_current(recipe.paths(models).optimized)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num_images", "0", "--prompt", "x"], "--num_images: expected a positive integer, got 0"),
        (["--batch_size", "-2", "--prompt", "x"], "--batch_size: expected a positive integer, got -2"),
        (["--num_inference_steps", "many", "--prompt", "x"], "expected a positive integer, got 'many'"),
        (["--guidance_scale", "-1", "--prompt", "x"], "expected a guidance scale from 0 to 100, got -1"),
        (["--provider", "tpu", "--prompt", "x"], "invalid choice: 'tpu'"),
        ([], "nothing to do: pass --prompt TEXT"),
        (["--prompt", "  "], "--prompt is empty"),
        (["--prompt", "x", "--model_id", "tiny", "--width", "100"], "--width 100 is not a multiple of 16"),
        (["--prompt", "x", "--model_id", "tiny", "--image_size", "120"], "use 112 or 128"),
        (["--prompt", "x", "--model_id", "no/such/model"], "--model_id 'no/such/model' is not a diffusers folder"),
        (["--prompt", "x", "--model_id", "./missing-folder"], "is not a diffusers folder"),
        (["--prompt", "x", "--model_id", "someone/not-downloaded"], "could not be downloaded"),
        (["--prompt", "x", "--model_id", "tiny", "--provider", "dml"], "pip install onnxruntime-directml"),
        (["--prompt", "x", "--model_id", "tiny", "--provider", "cuda"], "pip install onnxruntime-gpu"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(workspace, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.png").write_bytes(b"user file")
    code = main(workspace.args("--output_dir", str(out), *args))
    err = capsys.readouterr().err
    assert code != 0
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert [p.name for p in out.iterdir()] == ["keep.png"]


def test_folder_missing_a_component(workspace, tmp_path, capsys):
    from sd_utils.sources.builder import ARCHITECTURES, materialize

    broken = materialize(ARCHITECTURES["tiny"], tmp_path / "broken")
    shutil.rmtree(broken / "unet")
    code = main(workspace.args("--model_id", str(broken), "--prompt", "x"))
    err = capsys.readouterr().err
    assert code == 2
    assert "is missing unet/config.json" in err
    assert len(err.strip().splitlines()) == 1


def test_debug_shows_the_traceback(workspace, capsys):
    code = main(workspace.args("--model_id", "no/such/model", "--prompt", "x", "--debug"))
    assert code == 2
    assert "Traceback" in capsys.readouterr().err


def test_help_documents_every_option(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    from sd_utils.options import build_parser

    for action in build_parser()._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help, f"{action.option_strings} has no help"


# A1111's PNG-info grammar (modules/infotext_utils.py): "key: value" pairs, a value JSON-quoted when it holds a comma
_A1111_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _parse_a1111(text: str) -> dict[str, str]:
    *lines, last = text.strip().split("\n")
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    fields = {key: json.loads(value) if value.startswith('"') else value for key, value in _A1111_PAIR.findall(last)}
    return {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **fields}


def test_pngs_carry_a1111_parameters(tiny_optimized, tmp_path):
    """The ``parameters`` chunk reads back with A1111's grammar: prompt, negative prompt, sampler, schedule, seed."""
    out = tmp_path / "out"
    args = ("--prompt", "a red circle, dark background", "--negative_prompt", "blurry", "--seed", "42")
    args += ("--num_inference_steps", "2", "--scheduler", "dpmpp_2m_karras", "--guidance_scale", "6.5")
    assert main(tiny_optimized.tiny("", *args, "--output_dir", str(out))) == 0
    (png,) = out.glob("*.png")
    text = Image.open(png).text
    parsed = _parse_a1111(text["parameters"])
    assert parsed["Prompt"] == "a red circle, dark background" and parsed["Negative prompt"] == "blurry"
    assert parsed["Steps"] == "2" and parsed["Sampler"] == "DPM++ 2M" and parsed["Schedule type"] == "Karras"
    assert parsed["CFG scale"] == "6.5" and parsed["Seed"] == "42" and parsed["Size"] == "128x128"
    assert parsed["Model"] == "tiny" and parsed["Model hash"] == tiny_optimized.build().optimized.name.split("-")[-1]
    assert text["prompt"] == "a red circle, dark background" and text["scheduler"] == "dpmpp_2m_karras"


def test_builds_are_listed_with_their_sizes_and_deleted_by_name(tiny_optimized, tmp_path, capsys):
    models = tmp_path / "models"
    shutil.copytree(tiny_optimized.models_dir, models, symlinks=True)
    name = Workspace(models, tiny_optimized.cache_dir).build().optimized.name
    assert main(["--list_builds", "--models_dir", str(models)]) == 0
    listed = capsys.readouterr().out
    assert re.search(rf"^{name} +[\d.]+ MB  tiny \(builtin\) for cpu$", listed, re.M), listed
    assert main(["--delete_build", name[:-2], "--models_dir", str(models)]) == 2
    assert f"--delete_build {name[:-2]}: no such build" in capsys.readouterr().err  # names the close one
    assert main(["--delete_build", name, "--models_dir", str(models)]) == 0
    assert f"Deleted {name} (" in capsys.readouterr().out
    assert not (models / "optimized" / name).exists() and not (models / "unoptimized" / name).exists()
