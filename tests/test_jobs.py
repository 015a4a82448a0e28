"""--prompts_file jobs: rows checked up front, a manifest line per image, resume, and a real local Ray runtime."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from stable_diffusion_xl import main

PROJECT_DIR = Path(__file__).resolve().parent.parent
ROWS = [
    {"prompt": "a red circle", "seed": 5, "num_images": 2},
    {"prompt": "a blue square", "negative_prompt": "green", "num_inference_steps": 3},
    {"prompt": "a yellow star", "width": 64, "height": 128, "scheduler": "euler_a"},
    {"prompt": "a green triangle", "seed": 100, "guidance_scale": 0},
    {"prompt": "a red circle", "seed": 7},
    {"prompt": "a blue star", "num_images": 2, "seed": 40},
]
IMAGES = sum(row.get("num_images", 1) for row in ROWS)


def _job_file(tmp_path, rows=ROWS) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _args(workspace, prompts: Path, out: Path, *extra: str) -> list[str]:
    return workspace.tiny("--num_inference_steps 2", "--prompts_file", str(prompts), "--output_dir", str(out), *extra)


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]


def _pngs(out: Path) -> dict[str, bytes]:
    return {png.name: png.read_bytes() for png in sorted(out.glob("*.png"))}


def _check_job(out: Path) -> None:
    """Every image of ROWS exactly once, named by row, key, index and seed, with its manifest line and metadata."""
    manifest = _manifest(out)
    assert len(manifest) == IMAGES == len(_pngs(out))
    assert sorted(entry["file"] for entry in manifest) == sorted(_pngs(out))
    by_row = {}
    for entry in manifest:
        by_row.setdefault(entry["row"], []).append(entry)
        assert entry["model"] == "tiny" and entry["provider"] == "cpu" and entry["build"].startswith("tiny-")
        text = Image.open(out / entry["file"]).text
        assert text["prompt"] == entry["prompt"] == ROWS[entry["row"] - 1]["prompt"]
        assert text["seed"] == str(entry["seed"])
        assert entry["file"] == f"{entry['row']:05d}-{entry['key']}-{entry['image_index']}-{entry['seed']}.png"
    assert sorted(entry["seed"] for entry in by_row[1]) == [5, 6]  # the row's seed + i
    assert sorted(entry["seed"] for entry in by_row[6]) == [40, 41]
    assert by_row[2][0]["negative_prompt"] == "green" and by_row[2][0]["num_inference_steps"] == 3
    assert (by_row[3][0]["width"], by_row[3][0]["height"], by_row[3][0]["scheduler"]) == (64, 128, "euler_a")
    assert Image.open(out / by_row[3][0]["file"]).size == (64, 128)
    assert by_row[2][0]["seed"] is not None  # drawn and recorded


@pytest.fixture(scope="module")
def local_job(tiny_optimized, tmp_path_factory):
    """The 6-row job run once without Ray: the reference images."""
    folder = tmp_path_factory.mktemp("local_job")
    prompts = _job_file(folder)
    assert main(_args(tiny_optimized, prompts, folder / "out")) == 0
    return prompts, folder / "out"


def test_a_job_writes_every_image_once_with_its_manifest(local_job):
    _check_job(local_job[1])


def test_the_same_job_again_writes_nothing(tiny_optimized, local_job, capsys):
    prompts, out = local_job
    before = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}
    assert main(_args(tiny_optimized, prompts, out)) == 0
    assert f"Job done: 0 image(s) made, {IMAGES} already there" in capsys.readouterr().out
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir()} == before


def test_a_killed_job_resumes_to_the_same_images(tiny_optimized, local_job, tmp_path):
    """SIGKILL after three images (one of them mid-write), then the same command: the same files, byte for byte (the
    drawn seed of a started row is taken from its first image), each once in the manifest, no partial file."""
    prompts, reference = local_job
    out = tmp_path / "out"
    killed_at = (
        "import os, signal, sys\n"
        "from sd_utils.generation import output\n"
        "original, calls = output.save_png_as, [0]\n"
        "def killing(*args, **kwargs):\n"
        "    calls[0] += 1\n"
        "    if calls[0] == 4: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return original(*args, **kwargs)\n"
        "output.save_png_as = killing\n"
        "from sd_utils.jobs import rows\n"
        "rows.save_png_as = killing\n"
        "import stable_diffusion_xl\n"
        "sys.exit(stable_diffusion_xl.main(sys.argv[1:]))\n"
    )  # a fault injected into the test's own subprocess
    args = _args(tiny_optimized, prompts, out)
    killed = subprocess.run([sys.executable, "-c", killed_at, *args], cwd=PROJECT_DIR, capture_output=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL
    assert len(_pngs(out)) == 3
    # a drawn seed (row 2) must be the same as in the reference only if it was drawn from the same images: compare
    # the rows with seeds given, and that row 2 keeps the seed its first run recorded
    assert main(args) == 0
    _check_job(out)
    seeded = {name: data for name, data in _pngs(reference).items() if not name.startswith(("00002-", "00003-"))}
    assert {name: data for name, data in _pngs(out).items() if name in seeded} == seeded
    assert not [path for path in out.iterdir() if path.name.startswith(".") and path.name != ".job.lock"]


def test_bad_rows_are_one_line_and_nothing_runs(workspace, tmp_path, capsys):
    cases = [
        ({"prompt": "x", "seed": -1}, "row 2, seed: -1 is not an integer from 0 to 4294967295"),
        ({"prompt": "x", "num_images": "two"}, "row 2, num_images: 'two' is not a positive integer"),
        ({"prompt": "x", "scheduler": "plms"}, "row 2, scheduler: unknown scheduler 'plms'"),
        ({"prompt": "x", "colour": "red"}, "row 2: unknown field 'colour'"),
        ({"prompt": ""}, "row 2, prompt: empty"),
        ({"prompt": "x", "width": 100}, "row 2: --width 100 is not a multiple of 16"),
    ]
    for row, message in cases:
        prompts = _job_file(tmp_path, [{"prompt": "fine"}, row])
        out = tmp_path / "out"
        assert main(_args(workspace, prompts, out)) == 2
        err = capsys.readouterr().err
        assert f"--prompts_file {prompts}" in err and message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists() or not list(out.iterdir())


def test_txt_and_csv_prompt_files(tmp_path):
    from sd_utils.jobs.prompts_file import read_prompts_file

    txt = tmp_path / "p.txt"
    txt.write_text("# a comment\na red circle\n\n  a blue square  \n", encoding="utf-8")
    assert [(row.number, row.prompt) for row in read_prompts_file(txt)] == [(2, "a red circle"), (4, "a blue square")]
    csv = tmp_path / "p.csv"
    csv.write_text('prompt,seed,guidance_scale\n"a red circle, dark",3,7.5\na star,,\n', encoding="utf-8")
    rows = read_prompts_file(csv)
    assert [(row.prompt, row.seed, row.guidance_scale) for row in rows] == [
        ("a red circle, dark", 3, 7.5),
        ("a star", None, None),
    ]


# ---------------------------------------------------------------------------------------------------------- Ray


def test_a_ray_job_with_a_killed_actor_makes_the_local_runs_images(tiny_optimized, tmp_path):
    """--ray (a local runtime) --workers 2, one actor's process killed (kill -9) mid-job: Ray restarts it and retries
    its batch; every image once, the same files and bytes as the local run for the seeded rows, and none of Ray's
    notes on a run where all is well. (One job for both checks: a Ray runtime's start is the cost of this test.)"""
    psutil = pytest.importorskip("psutil")
    pytest.importorskip("ray")
    prompts, local, out = _job_file(tmp_path), tmp_path / "local", tmp_path / "out"
    slow = ("--num_inference_steps", "20")  # slow enough to kill an actor mid-job
    assert main(_args(tiny_optimized, prompts, local, *slow)) == 0
    args = _args(tiny_optimized, prompts, out, "--ray", "--workers", "2", *slow)
    job = subprocess.Popen([sys.executable, "stable_diffusion_xl.py", *args], cwd=PROJECT_DIR, stderr=subprocess.PIPE)
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and job.poll() is None and time.monotonic() < deadline:
        actors = [p for p in psutil.process_iter(["cmdline"]) if "ImageActor" in " ".join(p.info["cmdline"] or [])]
        if actors and list(out.glob("*.png")):  # an image is out: the actors are mid-job
            killed = actors[0].pid
            actors[0].send_signal(signal.SIGKILL)
        time.sleep(0.2)
    _, err = job.communicate(timeout=600)
    assert killed is not None, "no actor process was seen running"
    assert job.returncode == 0, err.decode()[-2000:]
    _check_job(out)
    seeded = {name: data for name, data in _pngs(local).items() if not name.startswith(("00002-", "00003-"))}
    assert {name: data for name, data in _pngs(out).items() if name in seeded} == seeded
    notes = ("Token authentication", "Starting execution", "Progress bars")
    assert not [note for note in notes if note in err.decode()]


def test_cpu_actors_share_the_cores_and_gpu_actors_take_a_gpu(monkeypatch):
    """Each of N CPU actors (or Serve replicas) runs cores / N ONNX Runtime threads unless SDXL_OLIVE_THREADS says."""
    import os

    from sd_utils.jobs.ray_job import actor_resources
    from sd_utils.runtime.providers import PROVIDERS, THREADS_VARIABLE

    monkeypatch.delenv(THREADS_VARIABLE, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    cpu = actor_resources(PROVIDERS["cpu"], 2)
    assert cpu == {"num_gpus": 0, "num_cpus": 1, "runtime_env": {"env_vars": {THREADS_VARIABLE: "4"}}}
    assert actor_resources(PROVIDERS["cpu"], 16)["runtime_env"]["env_vars"][THREADS_VARIABLE] == "1"
    monkeypatch.setenv(THREADS_VARIABLE, "3")
    assert actor_resources(PROVIDERS["cpu"], 2)["runtime_env"]["env_vars"][THREADS_VARIABLE] == "3"
    assert actor_resources(PROVIDERS["cuda"], 2) == {"num_gpus": 1, "num_cpus": 1}


def test_ray_without_an_address_that_answers_is_one_line(tiny_optimized, local_job, tmp_path, capsys):
    import socket

    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    prompts, _ = local_job
    code = main(_args(tiny_optimized, prompts, tmp_path / "out", "--ray", f"127.0.0.1:{port}"))
    err = capsys.readouterr().err
    assert code == 2 and f"--ray 127.0.0.1:{port}: no Ray cluster there" in err, err
    assert len(err.strip().splitlines()) == 1


def test_jobs_options_are_checked(workspace, tmp_path, capsys):
    prompts = _job_file(tmp_path)
    assert main(workspace.tiny("--prompt x --ray")) == 2
    assert "--ray and --workers run a --prompts_file job" in capsys.readouterr().err
    assert main(workspace.tiny("--prompt x", "--prompts_file", str(prompts))) == 2
    assert "--prompt and --prompts_file: give one" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


def test_ray_not_installed_is_said_before_anything_is_built(workspace, tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    models = tmp_path / "models"
    args = ["--model_id", "tiny", "--provider", "cpu", "--prompts_file", str(_job_file(tmp_path))]
    assert main([*args, "--ray", "--models_dir", str(models), "--output_dir", str(tmp_path / "out")]) == 3
    assert "--ray needs Ray, which is not installed: pip install 'ray[data]==2.60.0'" in capsys.readouterr().err
    assert not models.exists()


# ------------------------------------------------------------------------------- reliability of jobs (issue 31)


def test_a_job_run_again_with_other_settings_makes_its_own_images(tiny_optimized, tmp_path, capsys):
    """Everything that decides the pixels is in an image's key: other steps (command line) or another size (row)
    make new images, never 'already there'; the manifest says which settings made each."""
    rows = [{"prompt": "a red circle", "seed": 3}, {"prompt": "a blue square"}]
    prompts, out = _job_file(tmp_path, rows), tmp_path / "out"
    assert main(_args(tiny_optimized, prompts, out)) == 0
    assert "Job done: 2 image(s) made, 0 already there" in capsys.readouterr().out
    assert main(_args(tiny_optimized, prompts, out, "--num_inference_steps", "3")) == 0
    assert "Job done: 2 image(s) made, 0 already there" in capsys.readouterr().out
    assert main(_args(tiny_optimized, _job_file(tmp_path, [{**rows[0], "width": 64}, rows[1]]), out)) == 0
    assert "Job done: 1 image(s) made, 1 already there" in capsys.readouterr().out
    steps = sorted((entry["row"], entry["num_inference_steps"], entry["width"]) for entry in _manifest(out))
    assert steps == [(1, 2, 64), (1, 2, 128), (1, 3, 128), (2, 2, 128), (2, 3, 128)]
    assert len(_pngs(out)) == 5


def test_identical_rows_are_distinct_images_and_resume_alike(tiny_optimized, tmp_path, capsys):
    prompts, out = tmp_path / "same.TXT", tmp_path / "out"  # upper-case suffixes are accepted
    prompts.write_text("a red circle\n" * 3, encoding="utf-8")
    assert main(_args(tiny_optimized, prompts, out)) == 0
    first = _pngs(out)
    assert len(first) == 3 and len({name.split("-")[1] for name in first}) == 3  # three keys
    (out / sorted(first)[1]).unlink()  # as if the job had been killed before this image
    assert main(_args(tiny_optimized, prompts, out)) == 0
    assert "Job done: 1 image(s) made, 2 already there" in capsys.readouterr().out.splitlines()[-1]
    again = _pngs(out)
    assert len(again) == 3 and {name: again[name] for name in first if name in again} == {
        name: data for name, data in first.items() if name != sorted(first)[1]
    }


def test_seedless_rows_take_their_seeds_from_the_command_line(tiny_optimized, tmp_path):
    rows = [{"prompt": "a red circle", "num_images": 2}, {"prompt": "a blue star", "seed": 100}, {"prompt": "a sun"}]
    out = tmp_path / "out"
    assert main(_args(tiny_optimized, _job_file(tmp_path, rows), out, "--seed", "10")) == 0
    assert sorted((entry["row"], entry["seed"]) for entry in _manifest(out)) == [(1, 10), (1, 11), (2, 100), (3, 12)]


def test_two_runs_of_one_job_at_once_make_each_image_once(tiny_optimized, tmp_path):
    rows = [{"prompt": f"a red circle number {index}"} for index in range(4)]
    out = tmp_path / "out"
    command = [sys.executable, "stable_diffusion_xl.py", *_args(tiny_optimized, _job_file(tmp_path, rows), out)]
    runs = [subprocess.Popen(command, cwd=PROJECT_DIR, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert len(_pngs(out)) == 4 == len(_manifest(out))
    made = [int(line.split()[2]) for text in outputs for line in text.splitlines() if line.startswith("Job done")]
    assert sorted(made) == [0, 4]  # the second run waited for the first, then found everything made


def test_a_manifest_line_cut_by_a_kill_is_repaired(tiny_optimized, local_job, tmp_path):
    prompts, reference = local_job
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    manifest = (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (out / "manifest.jsonl").write_text("".join(manifest[:-1]) + manifest[-1][:20], encoding="utf-8")
    assert main(_args(tiny_optimized, prompts, out)) == 0
    _check_job(out)  # the cut line's image is listed again, and every line parses


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "x", "seed": True}, "seed: True is not an integer from 0 to 4294967295"),
        ({"prompt": "x", "seed": 2**32}, "seed: 4294967296 is not an integer from 0 to 4294967295"),
        ({"prompt": ["a", "b"]}, "prompt: ['a', 'b'] is not text"),
        ({"prompt": "x", "guidance_scale": False}, "guidance_scale: False is not 0 to 100"),
        ({"prompt": "x", "num_images": 100_000_000}, "num_images 100000000 is over 100,000; split the row"),
    ],
)
def test_row_types_are_checked(workspace, tmp_path, capsys, row, message):
    prompts = _job_file(tmp_path, [{"prompt": "fine"}, row])
    assert main(_args(workspace, prompts, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert f"--prompts_file {prompts} row 2" in err and message in err and len(err.strip().splitlines()) == 1, err


def test_a_csv_row_with_an_unquoted_comma_is_refused(workspace, tmp_path, capsys):
    prompts = tmp_path / "p.CSV"
    prompts.write_text('prompt,seed\n"a red circle, on the left",1\na red circle, on the left,2\n', encoding="utf-8")
    assert main(_args(workspace, prompts, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert f"--prompts_file {prompts} row 2 has 3 cells but the header has 2: quote a prompt" in err, err


def test_a_full_disk_counts_every_image_the_job_saved(tiny_optimized, tmp_path, monkeypatch, capsys):
    import errno

    from sd_utils.jobs import rows

    original, calls = rows.save_png_as, [0]

    def filling(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(rows, "save_png_as", filling)
    out = tmp_path / "out"
    assert main(_args(tiny_optimized, _job_file(tmp_path), out)) == 7
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert f"the disk of {out} is full: this run saved 4 of the job's {IMAGES} missing image(s)" in error, error
    assert len(_pngs(out)) == 4
