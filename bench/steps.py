"""Quality per step for every --scheduler, on the demo model: how few UNet evaluations reach Euler-50's score.

    python bench/steps.py [--models_dir models] [--cache_dir cache] [--steps 4,6,8,10,12,15,20,30] [--schedulers ...]

All 96 captions of the demo's shapes world are drawn by the optimized ONNX pipeline (CPU, the tool's own loading
code) with each scheduler at each step count, from the same starting latents and seeds, and scored by the demo's
programmatic judge (colour and shape right, %). Euler at 50 steps is the reference. Prints one JSON document: the
score and seconds per image of every (scheduler, steps), and for each scheduler the fewest steps whose score reaches
the reference's (and how many times fewer UNet evaluations that is; Heun evaluates the UNet twice per step).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

GUIDANCE = 9.0  # the demo's README setting
REFERENCE = ("euler", 50)
# UNet evaluations per step (Heun's second-order correction runs the UNet twice on all but the last step)
EVALUATIONS_PER_STEP = {"heun": 2}


def draw(pipeline, spec, scheduler: str, steps: int, *, scenes, latents, batch: int) -> tuple[float, float]:
    """(colour-and-shape score in %, seconds per image) of ``scheduler`` at ``steps``."""
    from sd_utils.demo_model import quality
    from sd_utils.generation.schedulers import make_scheduler

    pipeline.scheduler = make_scheduler(spec.scheduler_config, scheduler)
    started = time.perf_counter()
    images = quality.draw_all(pipeline, scenes, latents.clone(), steps=steps, guidance_scale=GUIDANCE, batch=batch)
    seconds = (time.perf_counter() - started) / len(scenes)
    return quality.score(images, scenes).colour_and_shape, round(seconds, 4)


def main(argv=None) -> int:
    from sd_utils.demo_model import quality, shapes
    from sd_utils.generation.schedulers import SAMPLERS
    from sd_utils.runtime.pipeline import load_pipeline
    from sd_utils.runtime.providers import PROVIDERS
    from sd_utils.sources.model_spec import Shape

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models_dir", type=Path, default=PROJECT_DIR / "models")
    parser.add_argument("--cache_dir", type=Path, default=PROJECT_DIR / "cache")
    parser.add_argument("--steps", default="4,6,8,10,12,15,20,30")
    parser.add_argument("--schedulers", default=",".join(name for name in SAMPLERS if name != "lcm"))
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)

    folder, spec = quality.optimized_demo(args.models_dir, args.cache_dir)
    shape = Shape(batch=args.batch, height=shapes.SIZE, width=shapes.SIZE)
    pipeline = load_pipeline(folder, spec, provider=PROVIDERS["cpu"], shape=shape, model_label="demo").pipeline
    pipeline.set_progress_bar_config(disable=True)
    scenes = list(shapes.ALL_SCENES)
    latents = quality.starting_latents(len(scenes), spec)
    common = {"scenes": scenes, "latents": latents, "batch": args.batch}

    reference_score, reference_seconds = draw(pipeline, spec, *REFERENCE, **common)
    print(json.dumps({"reference": [*REFERENCE, reference_score]}), file=sys.stderr, flush=True)
    runs, fewest = [], {}
    for scheduler in args.schedulers.split(","):
        for steps in (int(step) for step in args.steps.split(",")):
            score, seconds = draw(pipeline, spec, scheduler, steps, **common)
            runs.append({"scheduler": scheduler, "steps": steps, "score": score, "s_per_image": seconds})
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
            if score >= reference_score and scheduler not in fewest:
                evaluations = steps * EVALUATIONS_PER_STEP.get(scheduler, 1)
                fewest[scheduler] = {
                    "steps": steps,
                    "unet_evaluations": evaluations,
                    "fewer_evaluations_than_reference": round(REFERENCE[1] / evaluations, 2),
                }
    report = {
        "guidance_scale": GUIDANCE,
        "captions": len(scenes),
        "reference": {"scheduler": REFERENCE[0], "steps": REFERENCE[1], "score": reference_score,
                      "s_per_image": reference_seconds},
        "runs": runs,
        "fewest_steps_to_reference": fewest,
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
