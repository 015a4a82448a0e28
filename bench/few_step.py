"""Few-step images end to end on the CUDA provider: text encoders + UNet + VAE decoder, as the tool loads them.

    python bench/few_step.py --onnx_dir models/optimized/<build> --model_dir models/builtin/random-sdxl-base

Each case pins the sessions to its own static shape without classifier-free guidance (guidance 0: the UNet runs at
batch 1 per image, as SDXL-Turbo and SDXL-Lightning are run), uses trailing-spaced Euler (SDXL-Lightning's
scheduler; the spacing changes which timesteps run, not what a step costs), and times whole pipeline calls to PIL
images after one warm-up call. Prints one JSON document; times are medians in seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

# (side in pixels, steps, images per call)
CASES = ((1024, 4, 1), (512, 1, 1), (1024, 4, 4), (512, 1, 4))


def time_case(args, *, side: int, steps: int, batch: int) -> dict:
    import torch
    from diffusers import EulerDiscreteScheduler

    from sd_utils.generation.output import to_pil_images
    from sd_utils.runtime.pipeline import load_pipeline
    from sd_utils.runtime.providers import PROVIDERS
    from sd_utils.sources.model_spec import ModelSpec, Shape

    spec = ModelSpec.from_folder(Path(args.model_dir))
    shape = Shape(batch=batch, height=side, width=side, classifier_free_guidance=False)
    loaded = load_pipeline(Path(args.onnx_dir), spec, provider=PROVIDERS["cuda"], shape=shape, model_label="bench")
    pipe = loaded.pipeline
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)

    def call():
        images = pipe(
            ["a photo of a cat"] * batch,
            num_inference_steps=steps,
            guidance_scale=0.0,
            height=side,
            width=side,
            output_type="pt",
        ).images
        return to_pil_images(images)

    call()
    times = []
    for _ in range(args.runs):
        torch.cuda.synchronize()
        started = time.perf_counter()
        call()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    median = statistics.median(times)
    return {
        "side": side,
        "steps": steps,
        "batch": batch,
        "call_s": round(median, 4),
        "s_per_image": round(median / batch, 4),
        "images_per_s": round(batch / median, 2),
        "unet_graph": loaded.unet_graph is not None,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx_dir", required=True, help="optimized ONNX pipeline folder (--provider cuda)")
    parser.add_argument("--model_dir", required=True, help="the diffusers folder it was built from (model facts)")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args(argv)
    import onnxruntime

    onnxruntime.preload_dlls()
    results = []
    for side, steps, batch in CASES:
        try:
            results.append(time_case(args, side=side, steps=steps, batch=batch))
        except Exception as error:  # noqa: BLE001 - one failed case must not lose the others' figures
            results.append({"side": side, "steps": steps, "batch": batch, "error": str(error)[-1500:]})
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"cases": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
