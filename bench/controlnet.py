"""What a ControlNet costs per step: the same run without a ControlNet, with one, and with two, in one process.

    python bench/controlnet.py [--model_id tiny] [--models_dir models] [--provider cpu] [--size 128] [--steps 8]
                               [--repeats 3] [--controlnet DIR]

Without ``--controlnet`` one is written first from the model's UNet (``tests/lora_files.write_controlnet``: the
architecture of ``ControlNetModel.from_unet``, random output convolutions). Builds what is missing (the ControlNet,
the UNet that takes its residuals), makes a warm-up image per case, then prints a JSON line per case with the
median milliseconds between denoising steps and the median seconds per image.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))
sys.path.insert(0, str(PROJECT_DIR / "tests"))


def _timed(generator, request, out: Path) -> tuple[float, list[float]]:
    stamps: list[float] = []
    started = time.perf_counter()
    generator.generate(request, output_dir=out, on_step=lambda done, total: stamps.append(time.perf_counter()))
    return time.perf_counter() - started, [b - a for a, b in itertools.pairwise(stamps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_id", default="tiny")
    parser.add_argument("--models_dir", default="models")
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--controlnet", type=Path, default=None)
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
        argv += ["--prompt", "a lighthouse at dusk", "--seed", "1", "--output_dir", scratch]
        argv += ["--num_inference_steps", str(args.steps), "--image_size", str(args.size)]
        plain = parse_options(argv)
        job = app.plan(plain)
        controlnet = args.controlnet
        if controlnet is None:
            from lora_files import write_controlnet

            controlnet = write_controlnet(job.model.spec.root, out / "controlnet")
        cases = {"none": [], "1 ControlNet": [controlnet], "2 ControlNets": [controlnet, controlnet]}
        for case, nets in cases.items():
            extra = [
                item for net in nets for item in ("--controlnet", str(net), "--control_image", str(out / "control.png"))
            ]
            options = parse_options([*argv, *extra])
            job = app.plan(options)
            started = time.perf_counter()
            generator = app.Generator(options, job, app.prepare_models(options, job))
            ready = time.perf_counter() - started
            request = dataclasses.replace(job.request)
            _timed(generator, request, out)  # warm-up
            runs = [_timed(generator, request, out) for _ in range(args.repeats)]
            steps = [interval for _, intervals in runs for interval in intervals]
            row = {
                "case": case,
                "step_ms": round(1000 * statistics.median(steps), 1),
                "image_s": round(statistics.median(seconds for seconds, _ in runs), 3),
                "ready_s": round(ready, 1),
                "model": args.model_id,
                "provider": args.provider,
                "size": args.size,
                "steps": args.steps,
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
