"""Run-time LoRAs: on the plain build, with no Olive run and no new folder; ``<lora:name:w>`` tags; switching sets in
one session; a layer the graph does not hold is one line; the weight map on fp16, packed and NHWC layouts.

Parity with diffusers and with the fused path is in ``test_checkpoints.py`` (it shares that test's builds)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from lora_files import write_kohya_lora, write_peft_lora
from PIL import Image

from sd_utils import app
from sd_utils.errors import ModelNotFoundError
from sd_utils.options import parse_options
from stable_diffusion_xl import main
from tests.test_parity import psnr


@pytest.fixture(scope="module")
def lora_dir(tiny_optimized, tmp_path_factory) -> Path:
    root = tiny_optimized.models_dir / "builtin" / "tiny"
    folder = tmp_path_factory.mktemp("loras")
    write_peft_lora(root, folder / "style_peft.safetensors")
    (folder / "nested").mkdir()
    write_kohya_lora(root, folder / "nested" / "Detail_Kohya.safetensors", text_encoders=True, seed=2)
    return folder


def _pixels(folder: Path) -> np.ndarray:
    (path,) = sorted(folder.glob("*.png"))
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255


def _run(workspace, out: Path, prompt: str, *extra: str) -> int:
    args = workspace.tiny("--seed 5 --num_inference_steps 3 --image_size 96", "--prompt", prompt, "--output_dir")
    return main([*args, str(out), *extra])


def test_a_lora_runs_on_the_plain_build_and_a_tag_equals_the_option(tiny_optimized, lora_dir, tmp_path, caplog, capsys):
    """``--lora FILE:0.7`` and ``<lora:name:0.7>`` give the same pixels, neither runs an Olive workflow nor makes a
    build folder, and the PNG records the LoRA as A1111 does; an unknown name lists the closest ones."""
    builds = tiny_optimized.build_names()
    detail = lora_dir / "nested" / "Detail_Kohya.safetensors"
    with caplog.at_level(logging.INFO):
        assert _run(tiny_optimized, tmp_path / "option", "a red star", "--lora", f"{detail}:0.7") == 0
        assert (
            _run(tiny_optimized, tmp_path / "tag", "a red star <lora:Detail_Kohya:0.7>", "--lora_dir", str(lora_dir))
            == 0
        )
    assert not [line for line in caplog.messages if "convert ->" in line or "optimizing" in line]
    assert tiny_optimized.build_names() == builds
    assert psnr(_pixels(tmp_path / "option"), _pixels(tmp_path / "tag")) >= 60
    assert _run(tiny_optimized, tmp_path / "plain", "a red star") == 0
    assert psnr(_pixels(tmp_path / "plain"), _pixels(tmp_path / "tag")) < 40  # the LoRA changed the image
    (png,) = (tmp_path / "tag").glob("*.png")
    text = Image.open(png).text["parameters"]
    assert text.startswith("a red star <lora:Detail_Kohya:0.7>\n") and 'Lora hashes: "Detail_Kohya: ' in text
    (png,) = (tmp_path / "option").glob("*.png")
    assert Image.open(png).text["parameters"].startswith("a red star <lora:Detail_Kohya:0.7>\n")

    capsys.readouterr()
    code = _run(tiny_optimized, tmp_path / "typo", "x <lora:detail_kohy:1>", "--lora_dir", str(lora_dir))
    error = capsys.readouterr().err.strip()
    assert code == 2 and not (tmp_path / "typo").exists() and len(error.splitlines()) == 1
    assert "no detail_kohy.safetensors in --lora_dir" in error and "closest names there: Detail_Kohya" in error


def test_switching_loras_remakes_only_the_sessions_they_touch(tiny_optimized, lora_dir, tmp_path):
    """One generator (the window's, a job's): PEFT (UNet + encoders) -> kohya UNet-only... -> none; each gives the
    images a fresh run of that set gives, and untouched sessions are kept."""
    options = parse_options(
        tiny_optimized.tiny("--seed 5 --num_inference_steps 3 --image_size 96 --prompt x", "--lora_dir", str(lora_dir))
    )
    job = app.plan(options)
    generator = app.Generator(options, job, app.prepare_models(options, job))
    peft, kohya = lora_dir / "style_peft.safetensors", lora_dir / "nested" / "Detail_Kohya.safetensors"
    sets = [((peft, 1.0),), ((kohya, 0.5),), ((kohya, 0.9),), ()]
    sessions = []
    for index, loras in enumerate(sets):
        run = app.generation_request(app.dataclasses.replace(options, lora=loras), job.model)
        generator.generate(run, output_dir=tmp_path / f"switched{index}")
        loaded = generator._loaded[1]
        sessions.append(
            {part: getattr(loaded.pipeline, part).session for part in ("unet", "text_encoder", "vae_decoder")}
        )
        fresh = app.Generator(options, job, generator.ready)
        fresh.generate(run, output_dir=tmp_path / f"fresh{index}")
        assert psnr(_pixels(tmp_path / f"fresh{index}"), _pixels(tmp_path / f"switched{index}")) >= 60, loras
    assert len({id(session["vae_decoder"]) for session in sessions}) == 1  # no LoRA touches the VAE
    assert len({id(session["unet"]) for session in sessions}) == 4
    # kohya at 0.5 and at 0.9 touch the encoders as well; none of the last set: encoders made again without it
    assert len({id(session["text_encoder"]) for session in sessions}) == 4


def test_a_layer_the_graph_does_not_hold_is_one_line(tiny_optimized, lora_dir, tmp_path):
    """A LoRA layer whose weight a fusion folded away (here: taken out of a copied build's map) stops the run with
    one line naming the layer and the way out; a build without a map (an older version's) says to rebuild."""
    from sd_utils.runtime.lora_weights import lora_initializers
    from sd_utils.sources.lora import inspect_lora

    build = tmp_path / "build"
    shutil.copytree(tiny_optimized.build().optimized, build)
    map_file = build / "unet" / "weight_map.json"
    data = json.loads(map_file.read_text())
    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    del data["weights"][layer]
    map_file.write_text(json.dumps(data))
    lora = inspect_lora(lora_dir / "style_peft.safetensors", 1.0, components=("text_encoder", "text_encoder_2", "unet"))
    with pytest.raises(ModelNotFoundError) as error:
        lora_initializers(build, "unet", [lora])
    message = str(error.value)
    assert "\n" not in message and layer.removesuffix(".weight") in message and "--fuse_loras" in message
    map_file.unlink()
    with pytest.raises(ModelNotFoundError, match=r"built before run-time LoRAs.*--optimize"):
        lora_initializers(build, "unet", [lora])


def test_the_weight_map_follows_fp16_packed_and_nhwc_weights():
    """Weights as GPU builds hold them (fp16 by ONNX Runtime's converter, Q/K/V packed by head, a kernel in NHWC, a
    Linear as a transposed MatMul weight): every weight is found, and a change written through the map equals the
    same change made to the weights before packing."""
    from onnxruntime.transformers.float16 import convert_np_to_float16

    from sd_utils.optimize.weight_map import RowIndex, layout_view, weight_map

    rng = np.random.default_rng(0)
    heads, size, width = 2, 4, 8
    weights = {name: rng.standard_normal((width, width)).astype(np.float32) for name in ("q", "k", "v", "out")}
    weights["conv"] = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    weights["zero"] = np.zeros((width, width), np.float32)  # equal rows everywhere: placed by order
    weights["q"][0, :4] = [1e-9, -3e-8, 7e4, -1e30]  # values the converter clamps: the map's fp16 clamps them alike

    def pack(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        per_head = [values[name].T.reshape(width, heads, size) for name in ("q", "k", "v")]
        return {
            "qkv": convert_np_to_float16(np.stack(per_head, axis=2).reshape(width, heads * 3 * size)),
            "out_t": convert_np_to_float16(values["out"].T.copy()),
            "conv_nhwc": convert_np_to_float16(values["conv"].transpose(0, 2, 3, 1).copy()),
            "zero_t": convert_np_to_float16(values["zero"].T.copy()),
        }

    graph = pack(weights)
    places = weight_map(RowIndex(weights.items(), {np.dtype(np.float16)}), graph.items())
    assert set(places) == {"q", "k", "v", "out", "conv"}  # a constant tensor says nothing: left out
    assert {place[1] for name in places for place in places[name]} == {"columns", "nhwc"}
    changed = {name: weights[name] + rng.standard_normal(weights[name].shape).astype(np.float32) for name in places}
    written = {name: values.astype(np.float32) for name, values in graph.items()}
    for name, place_list in places.items():
        rows = (changed[name] - weights[name]).reshape(weights[name].shape[0], -1)
        for tensor, layout, spans in place_list:
            target = layout_view(written[tensor], layout)
            for first, row, count in spans:
                target[first : first + count] += rows[row : row + count].reshape((count, *target.shape[1:]))
    expected = pack({**weights, **changed})
    for name in ("qkv", "out_t", "conv_nhwc"):
        np.testing.assert_allclose(written[name], expected[name].astype(np.float32), rtol=2e-3, atol=1e-3)


def test_a_prompts_file_switches_loras_row_by_row(tiny_optimized, lora_dir, tmp_path):
    """A job whose rows ask for other LoRAs: every row gets its own set (the second equals a one-off run of it),
    and a rerun finds every image done."""
    rows = [{"prompt": "a <lora:style_peft:1>"}, {"prompt": "a <lora:Detail_Kohya:0.5>"}, {"prompt": "a"}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = tiny_optimized.tiny("--seed 5 --num_inference_steps 3 --image_size 96", "--lora_dir", str(lora_dir))
    assert main([*args, "--prompts_file", str(prompts), "--output_dir", str(tmp_path / "job")]) == 0
    made = sorted((tmp_path / "job").glob("*.png"))
    assert len(made) == 3
    assert main([*args, "--prompt", rows[1]["prompt"], "--seed", "6", "--output_dir", str(tmp_path / "one")]) == 0
    second = [path for path in made if "<lora:Detail_Kohya:0.5>" in Image.open(path).text["parameters"]]
    expected = np.asarray(Image.open(second[0]).convert("RGB"), dtype=np.float64) / 255
    assert psnr(expected, _pixels(tmp_path / "one")) >= 60
    assert main([*args, "--prompts_file", str(prompts), "--output_dir", str(tmp_path / "job")]) == 0
    assert sorted((tmp_path / "job").glob("*.png")) == made
