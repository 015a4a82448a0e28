"""The same --prompts_file job locally and on a local Ray runtime with 1 and 2 actors: images per second, one run.

    python bench/batch.py [--images 32] [--model_id tiny] [--models_dir models] [--cache_dir cache]

Each variant runs the tool's command line in its own process into a fresh output folder (the model optimized once
before). Reports wall time, images per second over the whole command, and, from the manifest's per-image seconds,
images per second once started (Ray's start-up and the actors' pipeline loading excluded). Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
VARIANTS = {"local": [], "ray_1_actor": ["--ray", "--workers", "1"], "ray_2_actors": ["--ray", "--workers", "2"]}


def run_variant(args, prompts: Path, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="batch-") as out:
        command = [sys.executable, "stable_diffusion_xl.py", "--model_id", args.model_id, "--provider", "cpu"]
        command += ["--models_dir", args.models_dir, "--cache_dir", args.cache_dir, "--prompts_file", str(prompts)]
        command += ["--num_inference_steps", str(args.steps), "--output_dir", out, *extra]
        started = time.perf_counter()
        subprocess.run(command, cwd=PROJECT_DIR, check=True, capture_output=True)
        wall = time.perf_counter() - started
        lines = [json.loads(line) for line in (Path(out) / "manifest.jsonl").read_text().splitlines()]
    steady = sorted(line["seconds"] for line in lines if line["seconds"] is not None)
    # per actor the first image carries its pipeline's loading; the rest is the steady rate of each actor
    workers = int(extra[-1]) if extra else 1
    per_image = sum(steady[: len(steady) - workers]) / max(1, len(steady) - workers)
    return {
        "images": len(lines),
        "wall_s": round(wall, 1),
        "images_per_s_whole_command": round(len(lines) / wall, 3),
        "images_per_s_once_started": round(workers / per_image, 3),
        "start_up_s": round(wall - len(lines) * per_image / workers, 1),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--model_id", default="tiny")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--models_dir", default=str(PROJECT_DIR / "models"))
    parser.add_argument("--cache_dir", default=str(PROJECT_DIR / "cache"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        prompts = Path(scratch) / "prompts.jsonl"
        rows = [{"prompt": f"a red circle number {index}", "seed": index} for index in range(args.images)]
        prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
        subprocess.run(  # the model optimized once, outside every timing
            [sys.executable, "stable_diffusion_xl.py", "--optimize", "--model_id", args.model_id, "--provider", "cpu",
             "--models_dir", args.models_dir, "--cache_dir", args.cache_dir],
            cwd=PROJECT_DIR, check=True, capture_output=True,
        )  # fmt: skip
        report = {name: run_variant(args, prompts, extra) for name, extra in VARIANTS.items()}
    local = report["local"]["images_per_s_once_started"]
    report["ray_1_actor_vs_local_once_started"] = round(report["ray_1_actor"]["images_per_s_once_started"] / local, 3)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
