"""Bad input and faults, as a new user or a tester meets them: one line, the documented exit code, nothing lost, and
a process killed at any phase never leaves something half-written that a later run uses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from stable_diffusion_xl import main
from tests.conftest import Workspace

PROJECT_DIR = Path(__file__).resolve().parent.parent
QUICK = "--prompt x --seed 1 --num_inference_steps 1"


def _workspace_copy(tiny_optimized, tmp_path) -> Workspace:
    """A workspace of its own that starts with the tiny build and its Olive cache (copied: a rebuild is quick)."""
    copy = Workspace(models_dir=tmp_path / "models", cache_dir=tmp_path / "cache")
    shutil.copytree(tiny_optimized.models_dir, copy.models_dir, symlinks=True)
    shutil.copytree(tiny_optimized.cache_dir, copy.cache_dir, symlinks=True)
    return copy


# ------------------------------------------------------------------------------------------- bad input: one line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model_id", "", "--prompt", "x"], ["--model_id is empty", "tiny"]),
        (["--model_id", "tiny", "--prompt", "x", "--guidance_scale", "inf"], ["--guidance_scale", "0 to 100", "inf"]),
        (["--model_id", "tiny", "--prompt", "x", "--guidance_scale", "1e308"], ["--guidance_scale", "got 1e308"]),
        (["--model_id", "tiny", "--prompt", "x", "--aesthetic_score", "nan"], ["--aesthetic_score", "0 to 10", "nan"]),
        (["--model_id", "tiny", "--prompt", "x", "--negative_aesthetic_score", "-inf"], ["--negative_aesthetic_score"]),
    ],
)
def test_values_that_can_only_fail_are_refused_before_anything_runs(workspace, args, message, capsys):
    assert main(workspace.args(*args)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(part in err for part in message), err


def test_an_output_dir_that_is_a_file_is_refused_before_optimizing(tmp_path, capsys):
    (tmp_path / "out").write_text("not a folder")
    args = ["--model_id", "tiny", "--provider", "cpu", *QUICK.split(), "--output_dir", str(tmp_path / "out")]
    assert main([*args, "--models_dir", str(tmp_path / "models")]) == 2
    err = capsys.readouterr().err
    assert f"--output_dir {tmp_path / 'out'} is a file" in err
    assert not (tmp_path / "models" / "optimized").exists()  # nothing was optimized first


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root writes to read-only folders")
def test_a_read_only_output_dir_is_refused(tmp_path, capsys):
    (tmp_path / "out").mkdir(mode=0o555)
    args = ["--model_id", "tiny", "--provider", "cpu", *QUICK.split(), "--output_dir", str(tmp_path / "out")]
    assert main([*args, "--models_dir", str(tmp_path / "models")]) == 2
    assert "cannot be written" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--models_dir", "--cache_dir"])
def test_a_models_or_cache_dir_that_is_a_file_is_refused(tmp_path, option, capsys):
    (tmp_path / "file").write_text("x")
    args = ["--model_id", "tiny", "--provider", "cpu", "--optimize", "--models_dir", str(tmp_path / "m")]
    args += ["--cache_dir", str(tmp_path / "c"), option, str(tmp_path / "file")]
    assert main(args) == 2
    assert f"{option} {tmp_path / 'file'} is a file" in capsys.readouterr().err


def test_interactive_without_a_display_is_refused_before_optimizing(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    args = ["--model_id", "tiny", "--provider", "cpu", "--interactive", "--models_dir", str(tmp_path / "m")]
    assert main(args) == 2
    assert "--interactive needs a display" in capsys.readouterr().err
    assert not (tmp_path / "m" / "optimized").exists()


def test_a_broken_model_index_is_named(tiny_optimized, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_optimized.models_dir / "builtin" / "tiny", folder)
    (folder / "model_index.json").write_text("{ broken")
    assert main(tiny_optimized.args("--model_id", str(folder), "--prompt", "x")) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'model_index.json'} is not valid JSON" in err and len(err.strip().splitlines()) == 1


def test_a_broken_build_record_means_not_built(tiny_optimized, tmp_path):
    from sd_utils.optimize.recipe import BUILD_FILE, BuildRecipe, read_record
    from sd_utils.sources.models import resolve_model

    work = _workspace_copy(tiny_optimized, tmp_path)
    paths = work.build()
    (paths.optimized / BUILD_FILE).write_text("{ broken")
    assert read_record(paths.optimized) is None
    assert not BuildRecipe.of(resolve_model("tiny", models_dir=work.models_dir), provider="cpu").is_current(
        paths.optimized
    )
    assert main(work.tiny(QUICK, "--output_dir", str(tmp_path / "out"))) == 0  # rebuilt, then used
    assert read_record(paths.optimized)["optimized"] is True


@pytest.mark.parametrize("damage", ["missing", "truncated_graph", "truncated_data"])
def test_a_damaged_build_is_rebuilt_not_loaded(tiny_optimized, tmp_path, damage, caplog):
    import logging

    work = _workspace_copy(tiny_optimized, tmp_path)
    unet = work.build().optimized / "unet"
    if damage == "missing":
        (unet / "model.onnx").unlink()
    elif damage == "truncated_graph":
        (unet / "model.onnx").write_bytes((unet / "model.onnx").read_bytes()[:100])
    else:
        data = next(p for p in unet.iterdir() if p.name != "model.onnx" and p.suffix != ".json")
        data.write_bytes(data.read_bytes()[:100])
    caplog.set_level(logging.INFO)
    assert main(work.tiny(QUICK, "--output_dir", str(tmp_path / "out"))) == 0
    assert "is incomplete" in caplog.text and "unet" in caplog.text
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


def test_refiner_steps_too_few_for_the_strength_are_refused_with_the_fix(tiny_refiner_optimized, tmp_path, capsys):
    image = tmp_path / "base.png"
    Image.new("RGB", (64, 64), "red").save(image)
    args = ["--model_id", "tiny-refiner", "--provider", "cpu", "--base_images", str(image), "--prompt", "x"]
    args += ["--num_inference_steps", "2", "--strength", "0.3", "--output_dir", str(tmp_path / "out")]
    assert main(tiny_refiner_optimized.args(*args)) == 2
    err = capsys.readouterr().err
    assert "--num_inference_steps 2 with --strength 0.3 runs no denoising step" in err
    assert "use --num_inference_steps 4 or more" in err


# --------------------------------------------------------------------------------------------------- output files


def test_a_long_prompt_is_read_whole_and_each_image_announced_once(tiny_optimized, tmp_path, capsys, caplog):
    """Past 77 tokens the prompt goes on in a second chunk (A1111's long prompts): nothing is cut or noted as cut,
    and the words after token 75 change the image."""
    import logging

    import numpy as np

    caplog.set_level(logging.INFO)
    words = "a red circle " * 40
    pixels = {}
    for name, prompt in (("long", words + "and a zebra"), ("cut", words)):
        out = tmp_path / name
        assert main(tiny_optimized.tiny(QUICK, "--prompt", prompt, "--output_dir", str(out))) == 0
        (png,) = out.glob("*.png")
        pixels[name] = np.asarray(Image.open(png))
        assert capsys.readouterr().out.count(png.name) == 1
        assert not [record for record in caplog.records if png.name in record.getMessage()]
    assert not [record for record in caplog.records if "longer than" in record.getMessage()]
    assert not np.array_equal(pixels["long"], pixels["cut"])


def test_pngs_and_built_models_follow_the_umask(tiny_optimized, tmp_path):
    from sd_utils.sources.builder import ARCHITECTURES, materialize

    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        assert main(tiny_optimized.tiny(QUICK, "--output_dir", str(out))) == 0
        (png,) = out.glob("*.png")
        assert stat.S_IMODE(png.stat().st_mode) == 0o644
        built = materialize(ARCHITECTURES["tiny"], tmp_path / "builtin" / "tiny")
        assert stat.S_IMODE(built.stat().st_mode) == 0o755
    finally:
        os.umask(old)


def test_numbering_goes_past_five_digits(tiny_optimized, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    Image.new("RGB", (8, 8)).save(out / "99999-1.png")
    assert main(tiny_optimized.tiny(QUICK + " --num_images 2", "--output_dir", str(out))) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["100000-1.png", "100001-2.png", "99999-1.png"]


# ---------------------------------------------------------------------------------------------------- concurrency


def test_two_processes_building_the_same_builtin_model_both_succeed(tmp_path):
    """Two fresh runs on an empty --models_dir: one builds the built-in model while the other waits for it."""
    command = [sys.executable, "-c", "import sys; from sd_utils.sources.models import resolve_model; "
               f"resolve_model('tiny', models_dir=__import__('pathlib').Path({str(tmp_path / 'm')!r}))"]  # fmt: skip
    runs = [subprocess.Popen(command, cwd=PROJECT_DIR, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [run.communicate(timeout=600)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errors
    assert [p.name for p in (tmp_path / "m" / "builtin").iterdir() if not p.name.endswith(".lock")] == ["tiny"]


def test_a_builtin_build_left_half_done_is_cleaned(tmp_path):
    from sd_utils.sources.models import resolve_model

    stale = tmp_path / "m" / "builtin" / ".tiny-k3j_x9qz"  # as tempfile.mkdtemp names them
    stale.mkdir(parents=True)
    (stale / "unet").mkdir()
    resolve_model("tiny", models_dir=tmp_path / "m")
    assert not stale.exists()


# ------------------------------------------------------------------------------------- the fault suite (SIGKILL)

KILLED_AT = """
import os, signal, sys, importlib
module_name, function_name, call = sys.argv[1], sys.argv[2], int(sys.argv[3])
module = importlib.import_module(module_name)
original = getattr(module, function_name)
calls = [0]

def killing(*args, **kwargs):
    calls[0] += 1
    if calls[0] == call:
        os.kill(os.getpid(), signal.SIGKILL)  # the process dies here, mid-phase: no clean-up runs
    return original(*args, **kwargs)

setattr(module, function_name, killing)  # a fault injected into a test's own process
import stable_diffusion_xl
sys.exit(stable_diffusion_xl.main(sys.argv[4:]))
"""

# (phase, function whose n-th call the process dies in)
PHASES = [
    ("building the built-in model", "sd_utils.sources.builder", "save_sdxl_tokenizers", 1),
    ("an Olive workflow", "sd_utils.optimize.olive_workflow", "pass_outputs", 3),
    ("assembling the build", "sd_utils.optimize.olive_workflow", "_place", 4),
    ("swapping the build in", "sd_utils.optimize.olive_workflow", "replace_folder", 2),
    ("writing a PNG", "sd_utils.generation.output", "_link_free_name", 1),
]


def _run(args: list[str], *, killed_at: tuple[str, str, int] | None = None) -> subprocess.CompletedProcess:
    """The CLI in a process of its own, killed (SIGKILL) in the ``call``-th call of ``module.function`` if given."""
    script = ["-c", KILLED_AT, *map(str, killed_at)] if killed_at else ["stable_diffusion_xl.py"]
    command = [sys.executable, *script, *args]
    return subprocess.run(command, cwd=PROJECT_DIR, capture_output=True, text=True, timeout=600)


def test_runs_killed_in_each_phase_leave_nothing_a_later_run_uses(tiny_optimized, tmp_path):
    """One workspace, one run killed per phase, in the order a run goes through them: each run must first recover
    from the kill before it (a half-built model, a half-run workflow, a half-assembled or half-swapped build) to reach
    its own phase, no kill leaves an image named like one, and the last run completes with nothing left over."""
    work = Workspace(models_dir=tmp_path / "models", cache_dir=tmp_path / "cache")
    shutil.copytree(tiny_optimized.cache_dir, work.cache_dir, symlinks=True)  # Olive's work is cached: quick runs
    out = tmp_path / "out"
    args = work.tiny(QUICK, "--output_dir", str(out))
    for phase, module, function, call in PHASES:
        killed = _run(args, killed_at=(module, function, call))
        assert killed.returncode == -signal.SIGKILL, f"{phase}: {killed.stderr[-2000:]}"
        assert not list(out.glob("[0-9]*.png")), phase  # killed before an image was complete: none named like one
    again = _run(args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(list(out.glob("[0-9]*.png"))) == 1
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no partial file left behind
    for parent in (work.models_dir, work.models_dir / "builtin", work.models_dir / "optimized"):
        assert not [p.name for p in parent.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]


def test_a_kill_during_optimize_with_clean_cache_does_not_break_the_next_run(tmp_path):
    """The probe of the reliability issue: SIGTERM during --optimize --clean_cache, then a plain --optimize."""
    work = Workspace(models_dir=tmp_path / "models", cache_dir=tmp_path / "cache")
    command = [sys.executable, "stable_diffusion_xl.py", *work.tiny("--optimize --clean_cache")]
    run = subprocess.Popen(command, cwd=PROJECT_DIR, stderr=subprocess.PIPE, text=True)
    lines = []

    def read():
        for line in run.stderr:
            lines.append(line)
            if "[3/5]" in line:  # two submodels are done and their outputs moved out of the cache
                run.send_signal(signal.SIGTERM)

    reader = threading.Thread(target=read)
    reader.start()
    run.wait(timeout=600)
    reader.join()
    assert run.returncode != 0
    again = subprocess.run(
        [sys.executable, "stable_diffusion_xl.py", *work.tiny("--optimize")],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "had lost models of an earlier run" in again.stderr  # detected, and the cache rebuilt
    record = json.loads((work.build().optimized / "build.json").read_text(encoding="utf-8"))
    assert record["optimized"] is True


# ----------------------------------------------------------------------------------------- files (issue 31)


def _truncated(source: Path, destination: Path) -> Path:
    """``source`` cut to 60% of its bytes, as an interrupted download leaves it."""
    data = source.read_bytes()
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_bytes(data[: len(data) * 6 // 10])
    return destination


def test_truncated_safetensors_are_one_line_naming_the_file(tiny_optimized, tmp_path, capsys):
    from sd_utils.sources.original_layout import write_single_file
    from tests.lora_files import write_peft_lora

    tiny = tiny_optimized.models_dir / "builtin" / "tiny"
    lora = _truncated(write_peft_lora(tiny, tmp_path / "full_lora.safetensors"), tmp_path / "lora.safetensors")
    checkpoint = _truncated(write_single_file(tiny, tmp_path / "full.safetensors"), tmp_path / "model.safetensors")
    unet = _truncated(tiny / "unet" / "diffusion_pytorch_model.safetensors", tmp_path / "unet.safetensors")
    folder = tmp_path / "folder"
    shutil.copytree(tiny, folder)
    _truncated(
        tiny / "vae" / "diffusion_pytorch_model.safetensors", folder / "vae" / "diffusion_pytorch_model.safetensors"
    )
    (folder / "sdxl_olive_builtin.json").unlink()
    cases = [
        (["--model_id", str(checkpoint)], checkpoint),
        (["--model_id", "tiny", "--lora", str(lora)], lora),
        (["--model_id", "tiny", "--unet", str(unet)], unet),
        (["--model_id", str(folder)], folder / "vae" / "diffusion_pytorch_model.safetensors"),
    ]
    for extra, named in cases:
        assert main(tiny_optimized.args("--provider", "cpu", *extra, "--prompt", "x")) == 2, extra
        err = capsys.readouterr().err
        assert f"{named} is incomplete:" in err and "download or copy it again" in err, err
        assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    ("extra", "message", "code"),
    [
        (["--lora", "{tmp}"], "--lora {tmp} is a folder; give the LoRA's .safetensors file in it", 2),
        (["--lora", "{tmp}/x.safetensors:abc"], "scale 'abc' is not a number; write FILE:0.8", 2),
        (["--prompts_file", "{tmp}/p.txt", "--workers", "2"], "--workers 2 sets the Ray actors of a job: add --ray", 2),
        (["--prompts_file", "{tmp}/p.txt", "--ray", "bogus"], "--ray bogus is not a Ray address", 2),
    ],
)
def test_lora_and_ray_values_get_their_own_line(workspace, tmp_path, capsys, extra, message, code):
    (tmp_path / "p.txt").write_text("a red circle\n", encoding="utf-8")
    args = [part.format(tmp=tmp_path) for part in extra]
    if "--prompts_file" not in args:
        args += ["--prompt", "x"]
    assert main(workspace.args("--model_id", "tiny", "--provider", "cpu", *args)) == code
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err and len(err.strip().splitlines()) == 1, err


def test_ray_client_addresses_need_ray_client(workspace, tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "grpc" else find_spec(name, *a))
    (tmp_path / "p.txt").write_text("a red circle\n", encoding="utf-8")
    args = ["--prompts_file", str(tmp_path / "p.txt"), "--ray", "ray://127.0.0.1:10001"]
    assert main(workspace.args("--model_id", "tiny", "--provider", "cpu", *args)) == 3
    assert "pip install 'ray[data,client]==2.60.0'" in capsys.readouterr().err


def test_a_16_bit_png_is_read_by_its_range(tmp_path):
    import numpy as np

    from sd_utils.generation.base_images import load_base_images, load_masks

    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    (image,) = load_base_images([tmp_path / "deep.png"], size=None, multiple=16)
    (mask,) = load_masks([tmp_path / "deep.png"], size=(64, 64))
    expected = np.round(ramp / 257).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(image.image)[..., 0], expected)
    np.testing.assert_array_equal(np.asarray(mask.image), expected)


def test_pngs_record_the_scheduler_that_ran(tiny_optimized, tmp_path):
    assert main(tiny_optimized.tiny(QUICK, "--output_dir", str(tmp_path))) == 0
    (png,) = tmp_path.glob("*.png")
    assert Image.open(png).text["scheduler"] == "euler"  # the tiny model's own (EulerDiscreteScheduler)


def test_lora_hashes_are_the_hash_civitai_uses(tmp_path):
    """A1111 and Civitai hash a LoRA's tensor data after the safetensors header (kohya's addnet hash)."""
    import hashlib

    import torch
    from safetensors.torch import save_file

    from sd_utils.sources.single_file import file_sha256

    path = tmp_path / "lora.safetensors"
    save_file({"x.lora_down.weight": torch.ones(2, 2)}, path, metadata={"ss_note": "a"})
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    assert file_sha256(path, tensors_only=True) == hashlib.sha256(data[header:]).hexdigest()
    save_file({"x.lora_down.weight": torch.ones(2, 2)}, path, metadata={"ss_note": "another"})
    assert file_sha256(path, tensors_only=True) == hashlib.sha256(data[header:]).hexdigest()  # metadata aside


def test_a_lora_for_another_layout_is_refused_not_half_applied(tiny_optimized, tmp_path, capsys):
    """Layers of a deeper UNet (transformer blocks the tiny model has not): the LoRA would apply in part; the run
    stops first, in one line naming the file."""
    from safetensors.torch import load_file, save_file

    from tests.lora_files import write_kohya_lora

    tiny = tiny_optimized.models_dir / "builtin" / "tiny"
    tensors = load_file(write_kohya_lora(tiny, tmp_path / "kohya.safetensors", text_encoders=True))
    deeper = {key.replace("transformer_blocks_0", "transformer_blocks_7"): value for key, value in tensors.items()}
    save_file(deeper, tmp_path / "deeper.safetensors")
    assert main(tiny_optimized.tiny(QUICK, "--lora", str(tmp_path / "deeper.safetensors"))) == 2
    err = capsys.readouterr().err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: --lora {tmp_path / 'deeper.safetensors'} does not fit the model"), err


def test_a_disk_that_fills_up_in_an_olive_pass_is_one_line(tmp_path, monkeypatch, capfd):
    """Olive logs a failed pass with its traceback on stdout and returns normally: a full disk there is the build's
    one line (exit 7), with nothing of Olive's on the screen."""
    import errno

    from sd_utils.optimize import external_data

    def full(self, tensor, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(external_data.ExternalDataWriter, "place", full)
    work = Workspace(models_dir=tmp_path / "models", cache_dir=tmp_path / "cache")
    assert main(work.tiny("--optimize")) == 7
    printed = capfd.readouterr()
    assert "Traceback" not in printed.out + printed.err and "No output model" not in printed.out
    (error,) = [line for line in printed.err.splitlines() if line.startswith("error:")]
    assert f"the disk filled up while optimizing into {work.models_dir}" in error
