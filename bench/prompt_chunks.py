"""What a long prompt costs: seconds per image for a 1-chunk and a 2-chunk prompt, with the UNet's text sequence
pinned (static shapes, the default) and left free (``--dynamic_dims``), in one process on this machine.

    python bench/prompt_chunks.py [--model_id tiny] [--size 128] [--steps 20] [--repeats 3]

Each case loads the pipeline once (as the window or a job does), makes one warm-up image (sessions made, prompts
encoded and kept, as the window keeps them), then times ``--repeats`` images and prints the median as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

SHORT = "a red circle on the left, dark background"
LONG = ", ".join([SHORT] * 10)  # ~100 tokens: two chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_id", default="tiny")
    parser.add_argument("--models_dir", default="models")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from sd_utils import app
    from sd_utils.options import parse_options

    for dims in ("static", "dynamic"):
        for name, prompt in (("1 chunk", SHORT), ("2 chunks", LONG)):
            with tempfile.TemporaryDirectory() as out:
                argv = ["--model_id", args.model_id, "--provider", "cpu", "--models_dir", args.models_dir]
                argv += ["--prompt", prompt, "--negative_prompt", "blurry", "--seed", "1", "--output_dir", out]
                argv += [
                    "--num_inference_steps",
                    str(args.steps),
                    "--width",
                    str(args.size),
                    "--height",
                    str(args.size),
                ]
                options = parse_options([*argv, *(["--dynamic_dims"] if dims == "dynamic" else [])])
                job = app.plan(options)
                generator = app.Generator(options, job, app.prepare_models(options, job))
                generator.generate(job.request)  # warm-up: sessions made, prompt encoded
                times = []
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    generator.generate(job.request)
                    times.append(time.perf_counter() - started)
            figure = {"shapes": dims, "prompt": name, "seconds_per_image": round(statistics.median(times), 4)}
            print(json.dumps({**figure, "steps": args.steps, "size": args.size, "model": args.model_id}), flush=True)


if __name__ == "__main__":
    main()
