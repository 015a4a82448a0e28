"""The safety-checker loop with tiny checkers built to flag deterministically."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from sd_utils.generation.safety import build_tiny_checker, image_embeddings
from stable_diffusion_xl import main

RUN = "--prompt x --num_inference_steps 3 --batch_size 1"


def _files(folder):
    return sorted(path.name for path in folder.glob("*.png")) if folder.exists() else []


def test_never_flagging_checker_writes_every_image(tiny_optimized, tmp_path, caplog):
    checker = build_tiny_checker(tmp_path / "never", threshold=2.0)  # a cosine never exceeds 1
    out = tmp_path / "out"
    code = main(tiny_optimized.tiny(f"{RUN} --num_images 3 --seed 40 --safety_checker {checker} --output_dir {out}"))
    assert code == 0
    assert _files(out) == ["00000-40.png", "00001-41.png", "00002-42.png"]
    assert (tiny_optimized.models_dir / "optimized" / "safety_checker" / "never" / "model.onnx").is_file()


def test_flagged_image_is_regenerated_with_a_fresh_seed(tiny_optimized, tmp_path):
    """Aim a checker at the image of seed 60: it is dropped and replaced by seed 62 (the first seed past the run)."""
    probe = build_tiny_checker(tmp_path / "probe", threshold=2.0)
    first = tmp_path / "first"
    assert (
        main(tiny_optimized.tiny(f"{RUN} --num_images 3 --seed 60 --safety_checker {probe} --output_dir {first}")) == 0
    )
    images = [Image.open(first / name).convert("RGB") for name in _files(first)]
    embeddings = torch.nn.functional.normalize(image_embeddings(probe, images), dim=1)
    similarity = embeddings @ embeddings[0]  # to the image of seed 60
    others = float(similarity[1:].max())
    if others > 0.9999:
        pytest.skip("the tiny model's images of seeds 60-62 embed alike; no threshold separates them")
    aimed = build_tiny_checker(tmp_path / "aimed", threshold=(others + 1) / 2, direction=embeddings[0])

    out = tmp_path / "out"
    code = main(tiny_optimized.tiny(f"{RUN} --num_images 2 --seed 60 --safety_checker {aimed} --output_dir {out}"))
    assert code == 0
    assert _files(out) == ["00000-61.png", "00001-62.png"]  # seed 60 flagged, never written
    assert Image.open(out / "00001-62.png").text["seed"] == "62"


def test_retry_cap_gives_a_clear_message_and_exit_code(tiny_optimized, tmp_path, capsys):
    checker = build_tiny_checker(tmp_path / "always", threshold=-2.0)  # every cosine exceeds -1
    out = tmp_path / "out"
    code = main(
        tiny_optimized.tiny(
            f"{RUN} --num_images 2 --seed 1 --max_safety_retries 1 --safety_checker {checker} --output_dir {out}"
        )
    )
    err = capsys.readouterr().err
    assert code == 5
    assert "2 of 2 image(s) were flagged by the safety checker 2 times and were not written (0 saved)" in err
    assert "--max_safety_retries" in err
    assert _files(out) == []


def test_without_a_checker_it_says_so_once(tiny_optimized, tmp_path, caplog):
    caplog.set_level("INFO", logger="sd_utils")
    assert main(tiny_optimized.tiny(f"{RUN} --num_images 2 --seed 3 --output_dir {tmp_path}")) == 0
    notes = [record for record in caplog.records if "no safety checker" in record.getMessage()]
    assert len(notes) == 1


def test_unknown_checker_is_a_one_line_error(workspace, tmp_path, capsys):
    code = main(workspace.tiny(f"{RUN} --safety_checker {tmp_path}"))
    err = capsys.readouterr().err
    assert code == 2
    assert "is not a safety checker folder" in err
    assert len(err.strip().splitlines()) == 1


def test_model_folder_with_its_own_checker(workspace, tiny_optimized, tmp_path):
    """A diffusers folder with safety_checker/ + feature_extractor/ components: the checker is used by default."""
    import json
    import shutil

    from sd_utils.sources.builder import ARCHITECTURES, materialize

    folder = materialize(ARCHITECTURES["tiny"], tmp_path / "tiny-with-checker")
    build_tiny_checker(folder / "safety_checker", threshold=2.0)
    (folder / "feature_extractor").mkdir()
    shutil.move(folder / "safety_checker" / "preprocessor_config.json", folder / "feature_extractor")
    index = json.loads((folder / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    (folder / "model_index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    args = ["--model_id", str(folder), "--provider", "cpu", *RUN.split(), "--num_images", "2", "--seed", "9"]
    assert main(workspace.args(*args, "--output_dir", str(out))) == 0
    assert _files(out) == ["00000-9.png", "00001-10.png"]
    checker = workspace.models_dir / "optimized" / "safety_checker" / "tiny-with-checker"
    assert (checker / "model.onnx").is_file() and (checker / "preprocessor_config.json").is_file()
