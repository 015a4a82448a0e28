"""``--serve``: a real server (``stable_diffusion_xl.py --serve`` in a process of its own, on a free port) driven by
A1111's own client library, ``webuiapi``, unmodified; and the same app on Ray Serve with two CPU replicas."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from stable_diffusion_xl import main

PROJECT_DIR = Path(__file__).resolve().parent.parent
USER, PASSWORD = "painter", "s3cret"
SIZE = 64
# what the tests ask for, and the same run on the command line
PROMPT, NEGATIVE, SEED, STEPS, CFG = "a red star, <lora:style:0.7>", "blurry", 11, 3, 6.5
CLI_RUN = f"--num_inference_steps {STEPS} --guidance_scale {CFG} --seed {SEED} --image_size {SIZE}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_serving(process: subprocess.Popen, port: int, log: Path, *, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        with contextlib.suppress(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/sdapi/v1/progress", timeout=5)
            return
        time.sleep(0.5)
    raise AssertionError(f"no server on port {port}: {log.read_text()}")


@pytest.fixture(scope="module")
def loras(tiny_optimized, tmp_path_factory) -> Path:
    """A --lora_dir with one LoRA (``style``) for the tiny model."""
    from lora_files import write_peft_lora

    folder = tmp_path_factory.mktemp("serve-loras")
    write_peft_lora(tiny_optimized.models_dir / "builtin" / "tiny", folder / "style.safetensors")
    return folder


@pytest.fixture(scope="module")
def edges(tiny_optimized, tmp_path_factory) -> Path:
    """A ControlNet (``edges``) for the tiny model."""
    from lora_files import write_controlnet

    return write_controlnet(tiny_optimized.models_dir / "builtin" / "tiny", tmp_path_factory.mktemp("cn") / "edges")


@pytest.fixture(scope="module")
def server(tiny_optimized, loras, edges, tmp_path_factory):
    """The tiny model served with basic authentication; yields (port, output folder)."""
    out = tmp_path_factory.mktemp("serve-out")
    port = _free_port()
    args = tiny_optimized.tiny("--serve --port", str(port), "--output_dir", str(out), "--lora_dir", str(loras))
    args += ["--controlnet", str(edges)]  # requests may use it (alwayson_scripts.controlnet)
    log = out.parent / "server.log"
    env = {**os.environ, "OLIVE_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1"}
    with log.open("w") as stream:
        process = subprocess.Popen(
            [sys.executable, "stable_diffusion_xl.py", *args, "--api_auth", f"{USER}:{PASSWORD},other:pw"],
            cwd=PROJECT_DIR,
            stdout=stream,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        _wait_until_serving(process, port, log)
        yield port, out
    finally:
        process.terminate()
        process.wait(timeout=30)


def _client(port: int):
    import webuiapi

    return webuiapi.WebUIApi(host="127.0.0.1", port=port, username=USER, password=PASSWORD)


def _txt2img(api, **extra):
    arguments = dict(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=STEPS, cfg_scale=CFG)
    arguments.update(width=SIZE, height=SIZE, sampler_name="DPM++ 2M", scheduler="karras")
    # a dict of its own: webuiapi adds ControlNet units into its default alwayson_scripts={}, which lives on
    arguments.update(alwayson_scripts={}, **extra)
    return api.txt2img(**arguments)


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_txt2img_gives_the_cli_pixels_and_metadata(server, tiny_optimized, loras, tmp_path):
    port, out = server
    result = _txt2img(_client(port), batch_size=2, save_images=True)
    cli = tmp_path / "cli"
    args = tiny_optimized.tiny(CLI_RUN, "--prompt", PROMPT, "--negative_prompt", NEGATIVE, "--output_dir", str(cli))
    args += ["--scheduler", "dpmpp_2m_karras", "--num_images", "2"]
    assert main([*args, "--batch_size", "2", "--lora_dir", str(loras)]) == 0
    expected = [Image.open(path) for path in sorted(cli.glob("*.png"))]
    assert [_pixels(image).tobytes() for image in result.images] == [_pixels(i).tobytes() for i in expected]
    assert result.info["all_seeds"] == [SEED, SEED + 1] and result.info["seed"] == SEED
    assert result.info["sampler_name"] == "DPM++ 2M"
    assert result.info["infotexts"][0] == expected[0].text["parameters"]  # A1111's infotext = the file's
    assert "Lora hashes: " in result.info["infotexts"][0]
    assert result.images[0].text["parameters"] == expected[0].text["parameters"]  # the PNG carries it too
    assert sorted(path.name for path in out.glob("*.png")) == [f"00000-{SEED}.png", f"00001-{SEED + 1}.png"]


def test_img2img_gives_the_cli_pixels_inpainting_and_png_info(server, tiny_optimized, tmp_path):
    api = _client(server[0])
    ramp = np.linspace(0, 255, SIZE, dtype=np.uint8)
    init = Image.fromarray(
        np.stack([np.tile(ramp, (SIZE, 1)), np.tile(ramp[:, None], (1, SIZE)), 255 - np.tile(ramp, (SIZE, 1))], axis=-1)
    )
    init.save(tmp_path / "init.png")
    result = api.img2img(images=[init], prompt="a blue square", seed=3, steps=4, width=SIZE, height=SIZE)
    # webuiapi's defaults: Euler a, CFG 7, denoising strength 0.75
    args = tiny_optimized.tiny("--num_inference_steps 4 --seed 3 --scheduler euler_a --strength 0.75", "--prompt")
    args += ["a blue square", "--guidance_scale", "7"]
    assert main([*args, "--base_images", str(tmp_path / "init.png"), "--output_dir", str(tmp_path / "cli")]) == 0
    (expected,) = (tmp_path / "cli").glob("*.png")
    assert _pixels(result.image).tobytes() == _pixels(Image.open(expected)).tobytes()
    assert "Denoising strength: 0.75" in result.info["infotexts"][0]
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 48, 48))
    inpainted = api.img2img(
        images=[init], mask_image=mask, prompt="a blue square", seed=3, steps=4, width=SIZE, height=SIZE
    )
    assert inpainted.image.size == (SIZE, SIZE)
    assert _pixels(inpainted.image).tobytes() != _pixels(result.image).tobytes()

    info = api.png_info(result.image).json
    assert info["parameters"]["Prompt"] == "a blue square" and info["parameters"]["Seed"] == "3"
    assert info["parameters"]["Size-1"] == str(SIZE) and info["info"].startswith("a blue square\n")


def test_controlnet_units_give_the_cli_pixels(server, tiny_optimized, loras, edges, tmp_path):
    import webuiapi

    shapes = Image.new("RGB", (SIZE, SIZE), "black")
    shapes.paste((255, 255, 255), (12, 20, 40, 52))
    shapes.save(tmp_path / "shapes.png")
    unit = webuiapi.ControlNetUnit(image=shapes, module="canny", model="edges [0123]", weight=0.8, threshold_a=50)
    unit.threshold_b, unit.guidance_end = 150, 0.8  # its default resize mode is fine: the image has the run's shape
    result = _txt2img(_client(server[0]), controlnet_units=[unit])
    args = tiny_optimized.tiny(
        CLI_RUN, "--prompt", PROMPT, "--negative_prompt", NEGATIVE, "--output_dir", str(tmp_path)
    )
    args += ["--scheduler", "dpmpp_2m_karras", "--lora_dir", str(loras), "--controlnet", f"{edges}:0.8"]
    args += ["--control_image", str(tmp_path / "shapes.png"), "--control_preprocess", "canny", "--canny_low", "50"]
    assert main([*args, "--canny_high", "150", "--control_end", "0.8"]) == 0
    (expected,) = tmp_path.glob("0*.png")
    assert _pixels(result.image).tobytes() == _pixels(Image.open(expected)).tobytes()
    assert 'ControlNet 0: "Module: canny, Model: edges [' in result.info["infotexts"][0]
    plain = _txt2img(_client(server[0]))
    assert _pixels(plain.image).tobytes() != _pixels(result.image).tobytes()
    unit.model = "depth"
    with pytest.raises(RuntimeError, match="not a ControlNet here"):
        _txt2img(_client(server[0]), controlnet_units=[unit])


def test_listings_options_and_bad_requests(server):
    port = server[0]
    api = _client(port)
    assert {"Euler a", "DPM++ 2M", "DPM++ 2M SDE", "LCM"} <= {row["name"] for row in api.get_samplers()}
    assert [row["name"] for row in api.get_schedulers()] == ["automatic", "karras"]
    assert [row["name"] for row in api.get_loras()] == ["style"]
    (model,) = api.get_sd_models()
    assert api.get_options()["sd_model_checkpoint"] == model["title"]
    assert api.set_options({"sd_model_checkpoint": model["title"]}) is None
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    base = f"http://127.0.0.1:{port}/sdapi/v1"
    auth = (USER, PASSWORD)
    bad = [
        ({"prompt": "x", "enable_hr": True}, "enable_hr"),
        ({"prompt": "x", "restore_faces": True}, "restore_faces"),
        ({"prompt": "x", "subseed_strength": 0.5}, "subseed_strength"),
        ({"prompt": "x", "sampler_name": "Restart"}, "sampler_name"),
        ({"prompt": "x", "width": 60, "steps": 2}, "--width 60"),
        ({"prompt": "x <lora:nothere>", "steps": 2, "width": SIZE, "height": SIZE}, "nothere"),
        ({"prompt": "x", "styles": ["cinematic"]}, "styles"),
    ]
    for payload, named in bad:
        answer = requests.post(f"{base}/txt2img", json=payload, auth=auth, timeout=60)
        assert answer.status_code == 422 and named in answer.json()["detail"], (payload, answer.text)
    answer = requests.post(f"{base}/options", json={"sd_model_checkpoint": "other"}, auth=auth, timeout=60)
    assert answer.status_code == 422 and "not a model here" in answer.json()["detail"]
    answer = requests.post(f"{base}/img2img", json={"init_images": ["not base64!"]}, auth=auth, timeout=60)
    assert answer.status_code == 422 and "init_images[0]" in answer.json()["detail"]
    assert len(_txt2img(api, steps=2).images) == 1  # the server lives on


def test_every_endpoint_needs_credentials(server):
    base = f"http://127.0.0.1:{server[0]}/sdapi/v1"
    for method, path in [("get", "progress"), ("post", "txt2img"), ("get", "sd-models"), ("post", "interrupt")]:
        for auth in (None, (USER, "wrong")):
            answer = getattr(requests, method)(f"{base}/{path}", json={}, auth=auth, timeout=30)
            assert answer.status_code == 401 and answer.headers["WWW-Authenticate"].startswith("Basic"), path
    assert requests.get(f"{base}/progress", auth=("other", "pw"), timeout=30).status_code == 200


def test_progress_interrupt_and_two_clients_at_once(server):
    port = server[0]
    api = _client(port)
    results: dict[str, object] = {}

    def run(name: str, **extra) -> None:
        try:
            results[name] = _txt2img(_client(port), **extra)
        except Exception as error:  # noqa: BLE001 - reported by the assertions below
            results[name] = error

    long = threading.Thread(target=run, args=("long",), kwargs={"steps": 1000})
    long.start()
    seen = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        seen = api.get_progress()
        if seen["progress"] > 0:
            break
        time.sleep(0.05)
    assert 0 < seen["progress"] < 1 and seen["state"]["sampling_steps"] == 1000 and seen["eta_relative"] > 0
    both = [threading.Thread(target=run, args=(name,), kwargs={"seed": seed}) for name, seed in (("a", 1), ("b", 2))]
    for thread in both:
        thread.start()
    time.sleep(1)
    queued = api.get_progress()
    assert queued["state"]["job_count"] == 3 and queued["queue"] == 2
    api.interrupt()
    long.join(timeout=120)
    for thread in both:
        thread.join(timeout=120)
    assert results["long"].images == []  # stopped before its image was done
    assert [results[name].info["all_seeds"] for name in ("a", "b")] == [[1], [2]]
    assert api.get_progress()["state"]["job_count"] == 0


def test_ray_serve_with_two_replicas_gives_the_same_pixels(server, tiny_optimized, loras, tmp_path):
    pytest.importorskip("ray.serve")
    from sd_utils import app
    from sd_utils.options import parse_options
    from sd_utils.serve import ray_serve

    expected = _txt2img(_client(server[0]))
    port = _free_port()
    args = tiny_optimized.tiny("--serve --ray --workers 2 --port", str(port), "--output_dir", str(tmp_path))
    options = parse_options([*args, "--lora_dir", str(loras), "--api_auth", f"{USER}:{PASSWORD}"])
    job = app.plan(options)
    ray_serve.serve_on_ray(options, job, app.prepare_models(options, job), block=False)
    try:
        results = []
        threads = [threading.Thread(target=lambda: results.append(_txt2img(_client(port)))) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert [_pixels(result.image).tobytes() for result in results] == [_pixels(expected.image).tobytes()] * 2
        assert requests.get(f"http://127.0.0.1:{port}/sdapi/v1/progress", timeout=30).status_code == 401
        _replicas_die_mid_request(port)
    finally:
        ray_serve.stop()


def _replicas_die_mid_request(port: int) -> None:
    """Killed replicas: the request they ran is answered with an error at once (not left hanging), Serve starts
    new ones, and the next request gets its image."""
    import ray

    answers = []
    url, auth = f"http://127.0.0.1:{port}/sdapi/v1/txt2img", (USER, PASSWORD)
    long = {"prompt": "x", "steps": 1000, "width": SIZE, "height": SIZE}
    thread = threading.Thread(target=lambda: answers.append(requests.post(url, json=long, auth=auth, timeout=120)))
    thread.start()
    time.sleep(2)
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith("SERVE_REPLICA::sdxl-olive"):
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
    thread.join(timeout=120)
    assert answers and answers[0].status_code >= 500
    again = requests.post(url, json={**long, "steps": 2}, auth=auth, timeout=180)
    assert again.status_code == 200 and len(again.json()["images"]) == 1


def test_serve_options_are_checked_before_anything_is_built(tmp_path, capsys):
    cases = [
        (["--serve", "--prompt", "x"], "--serve and --prompt"),
        (["--serve", "--workers", "2"], "add --ray"),
        (["--serve", "--api_auth", "nopassword"], "USER:PASS"),
        (["--prompt", "x", "--api_auth", "a:b"], "add --serve"),
    ]
    for extra, said in cases:
        assert main(["--models_dir", str(tmp_path / "models"), *extra]) == 2, extra
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and said in error[0], (extra, error)
    assert not (tmp_path / "models").exists()


def test_request_reading_takes_webuiapi_defaults():
    """Every field ``webuiapi`` sends at its defaults is accepted (a 422 for any would break every such client)."""
    from sd_utils.serve.a1111 import check_fields

    sent = {}

    class Recorder:
        def post_and_get_api_result(self, url, json, use_async):
            sent.update(json)

    import webuiapi

    client = webuiapi.WebUIApi()
    client.post_and_get_api_result = Recorder().post_and_get_api_result
    client.txt2img(prompt="x")
    check_fields(sent)
    assert len(sent) > 35
    sent.clear()
    client.img2img(images=[Image.new("RGB", (8, 8))], mask_image=Image.new("L", (8, 8)), prompt="x")
    check_fields(sent)
