"""Does ``--provider cuda`` make its images on a smaller card? The tool end to end with the GPU's free memory cut.

    python bench/memory_fit.py --models_dir /tmp/sdxl/models --model_id random-sdxl-base \
        --budgets 15,11,9,7 --variants default,session.use_env_allocators=0

Each trial is its own process. It takes all but ``budget`` GiB of the GPU's free memory (a torch tensor it holds
until it exits, as another program or a smaller card would), then runs the tool's command line (``main`` of
stable_diffusion_xl.py: the same code path as a user's, the model already optimized) for ``--num_images``
images (1024² by default) of 30 steps, one per pipeline call. It reports whether the run finished, its exit code
and last error line, the time from start to the first image and between later images (the steady state), and the
most memory it used of its budget (``cudaMemGetInfo`` sampled every 20 ms). A budget is what is free after CUDA has
started: a 12-GB card with a desktop on it leaves about 10.5-11 GiB.

A variant sets what every CUDA session of the tool gets besides its defaults: ``key=value`` pairs joined by ``+``,
a plain key a CUDA provider option, a dotted key a session config entry; ``default`` sets nothing
(``session.use_env_allocators=0``: every session an arena of its own, as before ``providers.share_arena``). Budgets
are tried from the largest down and the first that fails ends the variant. ``--runs 2`` makes the images in two runs
of one process with different prompts, as the window does (its second run makes ``--low_vram``'s text encoders again
after the first has grown the arena). Prints one JSON document.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

GIB = 2**30


def _settings(variant: str) -> dict[str, str]:
    return {} if variant == "default" else dict(item.split("=", 1) for item in variant.split("+"))


def _provider_table(settings: dict[str, str]) -> dict:
    """The tool's provider rows with ``settings`` (provider options and session config entries) added to CUDA's."""
    from sd_utils.runtime.providers import PROVIDERS

    options = tuple((key, value) for key, value in settings.items() if "." not in key)
    entries = tuple((key, value) for key, value in settings.items() if "." in key)
    cuda = PROVIDERS["cuda"]
    tuned = dataclasses.replace(
        cuda, options=(*cuda.options, *options), session_entries=(*cuda.session_entries, *entries)
    )
    return {**PROVIDERS, "cuda": tuned}


class _SavedTimes(logging.Handler):
    """Times of the tool's "saved <png>" log lines."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.times: list[float] = []

    def emit(self, record):
        if record.getMessage().startswith("saved "):
            self.times.append(time.perf_counter())


def _window_runs(argv: list[str], runs: int, table: dict) -> int:
    """The run of ``argv`` made ``runs`` times in one process, each with another prompt, as the window makes them;
    the CLI's exit code and error line."""
    from sd_utils import app
    from sd_utils.errors import SdxlOliveError
    from sd_utils.options import parse_options
    from stable_diffusion_xl import configure_logging

    options = parse_options(argv)
    configure_logging(debug=False)
    try:
        job = app.plan(options, provider_table=table)
        generator = app.Generator(options, job, app.prepare_models(options, job))
        for run in range(runs):
            prompt = job.request.prompt if run == 0 else f"{job.request.prompt}, run {run + 1}"
            generator.generate(dataclasses.replace(job.request, prompt=prompt))
    except SdxlOliveError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


def trial(args) -> dict:
    """One run of the tool within ``args.budget`` GiB; the child process's work."""
    import torch

    import stable_diffusion_xl

    free, _ = torch.cuda.mem_get_info()
    budget = int(args.budget * GIB)
    if free < budget:
        return {"error": f"only {free / GIB:.1f} GiB free"}
    held = torch.empty(free - budget, dtype=torch.uint8, device="cuda")  # noqa: F841 - held until the process ends
    table = _provider_table(_settings(args.variant))
    lowest = [torch.cuda.mem_get_info()[0]]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            lowest[0] = min(lowest[0], torch.cuda.mem_get_info()[0])
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    saved = _SavedTimes()
    run_logger = logging.getLogger("sd_utils.generation.run")
    run_logger.addHandler(saved)
    run_logger.setLevel(logging.DEBUG)  # its "saved <png>" lines time the images
    with tempfile.TemporaryDirectory(prefix="memory-fit-") as output:
        argv = [
            "--model_id", args.model_id, "--models_dir", args.models_dir, "--provider", "cuda",
            "--prompt", "a photo of a lighthouse", "--seed", "1", "--num_images", str(args.num_images),
            "--batch_size", "1", "--num_inference_steps", "30", "--width", str(args.size), "--height", str(args.size),
            "--output_dir", output, *shlex.split(args.tool_args),
        ]  # fmt: skip
        sampler.start()
        started = time.perf_counter()
        if args.runs == 1:
            code = stable_diffusion_xl.main(argv, provider_table=table)
        else:
            code = _window_runs(argv, args.runs, table)
        stop.set()
        sampler.join()
        if args.keep_images:  # the first image, to compare variants by
            for png in sorted(Path(output).glob("*.png"))[:1]:
                name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{args.variant}-{args.budget:g}GiB.png")
                shutil.copy(png, Path(args.keep_images) / name)
    result = {"exit_code": code, "images": len(saved.times), "used_gib": round((budget - lowest[0]) / GIB, 2)}
    if saved.times:
        result["first_image_s"] = round(saved.times[0] - started, 1)
        gaps = [later - earlier for earlier, later in zip(saved.times, saved.times[1:], strict=False)]
        if gaps:
            result["image_s"] = round(min(gaps), 3)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models_dir", required=True)
    parser.add_argument("--model_id", default="random-sdxl-base")
    parser.add_argument("--budgets", default="15,11,9,7", help="free GiB per trial, tried from the largest down")
    parser.add_argument("--variants", default="default")
    parser.add_argument("--num_images", type=int, default=3)
    parser.add_argument("--size", type=int, default=1024, help="image width and height")
    parser.add_argument(
        "--tool_args", default="", help='more options for every trial\'s run, e.g. "--use_fp16_fixed_vae DIR"'
    )
    parser.add_argument("--keep_images", help="a folder to copy each trial's first image into")
    parser.add_argument("--runs", type=int, default=1, help="runs of --num_images images each, in one process")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.variant is not None:  # child process
        print("RESULT " + json.dumps(trial(args)), flush=True)
        return 0

    if args.keep_images:
        Path(args.keep_images).mkdir(parents=True, exist_ok=True)
    settings = {"size": args.size, "steps": 30, "num_images": args.num_images, "runs": args.runs}
    settings["tool_args"] = args.tool_args
    report = {"settings": settings, "variants": {}}
    for variant in args.variants.split(","):
        trials = report["variants"][variant] = {}
        for budget in sorted((float(b) for b in args.budgets.split(",")), reverse=True):
            command = [sys.executable, __file__, "--models_dir", args.models_dir, "--model_id", args.model_id]
            command += ["--num_images", str(args.num_images), "--size", str(args.size), f"--tool_args={args.tool_args}"]
            command += ["--runs", str(args.runs)]
            command += ["--variant", variant, "--budget", str(budget)]
            if args.keep_images:
                command += ["--keep_images", args.keep_images]
            child = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
            result = json.loads(lines[-1][len("RESULT ") :]) if lines else {"exit_code": child.returncode}
            if result.get("exit_code") != 0 or result.get("images") != args.num_images * args.runs:
                errors = [line for line in child.stderr.splitlines() if "error" in line.lower()]
                line = (errors or child.stderr.splitlines() or ["(no output)"])[-1]
                # head and tail: ONNX Runtime's messages put the C++ location first and the cause last
                result["error"] = line if len(line) <= 1200 else f"{line[:500]} [...] {line[-700:]}"
            trials[f"{budget:g}"] = result
            print(json.dumps({variant: {f"{budget:g}": result}}), file=sys.stderr, flush=True)
            if "error" in result:
                break
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
