"""What a ControlNet costs per step: the same run without a ControlNet, with one, and with two, in one process.

    python bench/controlnet.py [--model_id tiny] [--models_dir models] [--cache_dir cache] [--provider cpu]
                               [--size 128] [--steps 8]
                               [--repeats 3] [--controlnet DIR] [--parallel_builds]

Without ``--controlnet`` one is written first from the model's UNet (``tests/lora_files.write_controlnet``: the
architecture of ``ControlNetModel.from_unet``, random output convolutions). Builds what is missing first (the
ControlNet, the UNet that takes its residuals: ``build_s``), then per case makes a warm-up image and prints a JSON
line with the median milliseconds between denoising steps and the median seconds per image. ``--parallel_builds``
makes the three builds a first ControlNet run makes one after another (the model's, the UNet with residual inputs,
the ControlNet) in three processes at once: on a many-core GPU machine that is ~2x less of a lent session.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))
sys.path.insert(0, str(PROJECT_DIR / "tests"))
from loras import timed_image  # noqa: E402 (bench/ is on the path of a bench script)
from parallel_builds import build_in_parallel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_id", default="tiny")
    parser.add_argument("--models_dir", default="models")
    parser.add_argument("--cache_dir", default="cache")
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--controlnet", type=Path, default=None)
    parser.add_argument("--parallel_builds", action="store_true")
    args = parser.parse_args()

    from PIL import Image, ImageDraw

    from sd_utils import app
    from sd_utils.options import parse_options

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        image = Image.new("RGB", (args.size, args.size), "black")
        ImageDraw.Draw(image).ellipse((args.size // 8, args.size // 8, args.size // 2, args.size // 2), fill="white")
        image.save(out / "control.png")
        argv = ["--model_id", args.model_id, "--provider", args.provider, "--models_dir", args.models_dir]
        argv += ["--cache_dir", args.cache_dir]
        argv += ["--prompt", "a lighthouse at dusk", "--seed", "1", "--output_dir", scratch]
        argv += ["--num_inference_steps", str(args.steps), "--image_size", str(args.size)]
        plain = parse_options(argv)
        job = app.plan(plain)
        controlnet = args.controlnet
        if controlnet is None:
            from lora_files import write_controlnet

            controlnet = write_controlnet(job.model.spec.root, out / "controlnet")
        if args.parallel_builds:
            build_in_parallel(args, ("unet_controlnet",), (_build_controlnet, (args, controlnet)))
        cases = {"none": [], "1 ControlNet": [controlnet], "2 ControlNets": [controlnet, controlnet]}
        runs_of = {}
        for case, nets in cases.items():
            extra = [
                item for net in nets for item in ("--controlnet", str(net), "--control_image", str(out / "control.png"))
            ]
            options = parse_options([*argv, *extra])
            job = app.plan(options)
            started = time.perf_counter()
            runs_of[case] = (options, job, app.prepare_models(options, job), time.perf_counter() - started)
        for case, (options, job, ready_models, ready) in runs_of.items():
            generator = None
            gc.collect()  # one pipeline in memory at a time (a full-size one takes half of a 24 GB machine)
            generator = app.Generator(options, job, ready_models)
            request = dataclasses.replace(job.request)
            timed_image(generator, request, out)  # warm-up
            runs = [timed_image(generator, request, out) for _ in range(args.repeats)]
            steps = [interval for _, intervals in runs for interval in intervals]
            row = {
                "case": case,
                "step_ms": round(1000 * statistics.median(steps), 1),
                "image_s": round(statistics.median(seconds for seconds, _ in runs), 3),
                "build_s": round(ready, 1),
                "model": args.model_id,
                "provider": args.provider,
                "size": args.size,
                "steps": args.steps,
            }
            print(json.dumps(row), flush=True)


def _build_controlnet(args, controlnet: Path) -> None:
    from sd_utils.optimize.controlnets import controlnet_build
    from sd_utils.runtime.providers import PROVIDERS
    from sd_utils.sources.controlnet import resolve_controlnet
    from sd_utils.sources.models import resolve_model

    model = resolve_model(args.model_id, models_dir=Path(args.models_dir))
    provider = PROVIDERS[args.provider]
    source = resolve_controlnet(str(controlnet), 1.0, base=model.spec, models_dir=Path(args.models_dir))
    controlnet_build(source, model, provider, models_dir=Path(args.models_dir), tempdir=None)


if __name__ == "__main__":
    main()
