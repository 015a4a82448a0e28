"""What switching run-time LoRAs costs: one generator (as the window or a job holds it) goes from no LoRA to a LoRA
on the UNet and both text encoders and back, twice, and times each switch and the steps before and after.

    python bench/loras.py [--model_id tiny] [--models_dir models] [--provider cpu] [--size 128] [--steps 8]
                          [--rank 32] [--repeats 3] [--lora FILE]

Without ``--lora`` a rank-``--rank`` PEFT LoRA on the attention of the UNet and both text encoders is written first
(``tests/lora_files.py``, random matrices of std ``--std``: 0.02 changes a full-size model about as much as a trained
LoRA; far stronger ones make the activations overflow, and steps on such values run slower on the CPU whatever
holds the weights). Each phase prints a JSON line: ``switch_s`` is the first image's time
minus the median of the next ``--repeats`` (the sessions made again, the LoRA read and merged), ``image_s`` that
median, ``step_ms`` the median time between denoising steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
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


def timed_image(generator, request, out: Path) -> tuple[float, list[float]]:
    """(seconds for the image, the intervals between its steps)."""
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
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lora", type=Path, default=None)
    parser.add_argument("--std", type=float, default=0.02, help="of the written LoRA's random matrices (see above)")
    args = parser.parse_args()

    from sd_utils import app
    from sd_utils.options import parse_options

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        argv = ["--model_id", args.model_id, "--provider", args.provider, "--models_dir", args.models_dir]
        argv += ["--prompt", "a lighthouse at dusk", "--seed", "1", "--output_dir", scratch]
        argv += ["--num_inference_steps", str(args.steps), "--image_size", str(args.size)]
        options = parse_options(argv)
        job = app.plan(options)
        ready = app.prepare_models(options, job)
        lora = args.lora
        if lora is None:
            from lora_files import write_peft_lora

            started = time.perf_counter()
            destination = out / "loras" / "bench_lora.safetensors"
            lora = write_peft_lora(job.model.spec.root, destination, rank=args.rank, std=args.std)
            gc.collect()  # the PyTorch model it was made on
            print(json.dumps({"wrote_lora_s": round(time.perf_counter() - started, 1), "rank": args.rank}), flush=True)
        generator = app.Generator(options, job, ready)
        plain = job.request
        with_lora = app.generation_request(dataclasses.replace(options, lora=((lora, 0.8),)), job.model)
        timed_image(generator, plain, out)  # warm-up: sessions made, prompt encoded
        for phase, request in (("lora", with_lora), ("none", plain), ("lora again", with_lora), ("none again", plain)):
            first, _ = timed_image(generator, request, out)
            runs = [timed_image(generator, request, out) for _ in range(args.repeats)]
            image = statistics.median(seconds for seconds, _ in runs)
            steps = [interval for _, intervals in runs for interval in intervals]
            row = {
                "phase": phase,
                "switch_s": round(first - image, 3),
                "image_s": round(image, 3),
                "step_ms": round(1000 * statistics.median(steps), 2) if steps else None,
                "model": args.model_id,
                "provider": args.provider,
                "size": args.size,
                "steps": args.steps,
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
