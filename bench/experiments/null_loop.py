"""The denoising loop's own host time per step: an optimized build's pipeline as the tool loads it, its UNet replaced
by a function that returns a ready tensor at once, so what remains is diffusers' loop, the scheduler and the tool's
UNet adapter.

    python bench/experiments/null_loop.py --model_dir models/builtin/tiny --onnx_dir models/optimized/tiny-<hash> \
        [--provider cpu] [--size 128] [--profile]

Prints one JSON line: ms per step (the median of 5 calls of 51 steps less that of 5 calls of 1 step, over 50),
and with ``--profile`` the 12 costliest functions of a 201-step call by own time (``benchmark.host_profile``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_DIR))
sys.path.insert(0, str(PROJECT_DIR / "bench"))  # benchmark.host_profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, type=Path)
    parser.add_argument("--onnx_dir", required=True, type=Path)
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    import torch

    from sd_utils.runtime import optimum_adapter
    from sd_utils.runtime.pipeline import load_pipeline
    from sd_utils.runtime.providers import PROVIDERS
    from sd_utils.sources.model_spec import ModelSpec, Shape

    spec = ModelSpec.from_folder(args.model_dir)
    shape = Shape(batch=1, height=args.size, width=args.size)
    provider = PROVIDERS[args.provider]
    pipe = load_pipeline(args.onnx_dir, spec, provider=provider, shape=shape, model_label="null").pipeline
    pipe.set_progress_bar_config(disable=True)
    latent = args.size // spec.vae_scale_factor
    ready = torch.zeros((2, spec.latent_channels, latent, latent), device=pipe.device)
    optimum_adapter.set_unet_forward(pipe, lambda feeds: ready)
    call = dict(height=args.size, width=args.size, output_type="latent", guidance_scale=5.0)

    def synchronize() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def seconds(steps: int) -> float:
        started = time.perf_counter()
        pipe("a photo", num_inference_steps=steps, **call)
        synchronize()
        return time.perf_counter() - started

    seconds(1), seconds(51)  # warm-up
    short = statistics.median(seconds(1) for _ in range(5))
    long = statistics.median(seconds(51) for _ in range(5))
    row = {"provider": args.provider, "host_ms_per_step": round((long - short) / 50 * 1000, 3)}
    if args.profile:
        from benchmark import host_profile

        rows = host_profile(lambda: pipe("a photo", num_inference_steps=201, **call), synchronize=synchronize, top=12)
        row["profile_own_us_per_step"] = {entry["function"]: round(entry["own_ms"] / 201 * 1000, 1) for entry in rows}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
