"""Does the demo model draw what it is asked? Score it through the optimized ONNX pipeline and through PyTorch.

    python -m sd_utils.demo_model.quality [--models_dir models] [--cache_dir cache] [--steps 25] [--guidance_scale 7]

Every scene of the shapes world (4 colours x 4 shapes x 3 positions x 2 backgrounds = 96 prompts) is drawn once by
the optimized ONNX pipeline of ``--model_id demo`` (optimized first if needed, CPU) and once by the diffusers
PyTorch pipeline on the same weights, scheduler and starting latents. The judge (shapes.py) reads each image back.
Passes when >= 90% of the (colour, shape) pairs are right and the two scores are within 2 points.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from . import shapes

PASS_SCORE = 90.0
MAX_GAP = 2.0
SEED = 1234


@dataclasses.dataclass
class Score:
    colour_and_shape: float  # % of images with colour and shape right
    colour: float
    shape: float
    position: float
    misses: list[str]


def score(images: np.ndarray, scenes: list[shapes.Scene]) -> Score:
    verdicts = [shapes.judge(image) for image in images]

    def percent(hits) -> float:
        return round(100.0 * sum(hits) / len(scenes), 1)

    return Score(
        colour_and_shape=percent(v.matches(s) for v, s in zip(verdicts, scenes, strict=True)),
        colour=percent(v.colour == s.colour for v, s in zip(verdicts, scenes, strict=True)),
        shape=percent(v.shape == s.shape for v, s in zip(verdicts, scenes, strict=True)),
        position=percent(v.position == s.position for v, s in zip(verdicts, scenes, strict=True)),
        misses=[
            f"{s.caption} -> {v.colour} {v.shape}" for v, s in zip(verdicts, scenes, strict=True) if not v.matches(s)
        ],
    )


def starting_latents(count: int, spec) -> torch.Tensor:  # noqa: F821
    import torch

    size = shapes.SIZE // spec.vae_scale_factor
    generator = torch.Generator().manual_seed(SEED)
    return torch.randn((count, spec.latent_channels, size, size), generator=generator)


def draw_all(pipeline, scenes, latents, *, steps: int, guidance_scale: float, batch: int, **extra) -> np.ndarray:
    """Run ``pipeline`` (ONNX or PyTorch SDXL) over ``scenes`` in batches; returns uint8 images. ``extra``: more
    pipeline arguments (a step callback)."""
    images = []
    for start in range(0, len(scenes), batch):
        chunk = scenes[start : start + batch]
        out = pipeline(
            prompt=[scene.caption for scene in chunk],
            latents=latents[start : start + batch],
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=shapes.SIZE,
            width=shapes.SIZE,
            output_type="np",
            **extra,
        ).images
        images.append(np.clip(np.asarray(out) * 255 + 0.5, 0, 255).astype(np.uint8))
    return np.concatenate(images)


def optimized_demo(models_dir: Path, cache_dir: Path, *extra: str):
    """(optimized folder, spec) of ``--model_id demo`` for CPU, optimized by the tool if it has no current build;
    ``extra``: more options whose graphs the build gets (``--cache_interval 2``: DeepCache's)."""
    from sd_utils import app
    from sd_utils.options import parse_options

    args = ["--model_id", "demo", "--provider", "cpu", "--prompt", "quality check"]
    options = parse_options([*args, "--models_dir", str(models_dir), "--cache_dir", str(cache_dir), *extra])
    job = app.plan(options)
    return app.prepare_models(options, job).model.optimized, job.model.spec


def run(models_dir: Path, cache_dir: Path, *, steps: int, guidance_scale: float, batch: int = 16) -> dict:
    import torch
    from diffusers import StableDiffusionXLPipeline

    from sd_utils.runtime.pipeline import load_pipeline
    from sd_utils.runtime.providers import PROVIDERS
    from sd_utils.sources.model_spec import Shape

    scenes = list(shapes.ALL_SCENES)
    folder, spec = optimized_demo(models_dir, cache_dir)
    latents = starting_latents(len(scenes), spec)
    onnx = load_pipeline(
        folder,
        spec,
        provider=PROVIDERS["cpu"],
        shape=Shape(batch=batch, height=shapes.SIZE, width=shapes.SIZE),
        model_label="demo",
    ).pipeline
    onnx.set_progress_bar_config(disable=True)
    onnx_images = draw_all(onnx, scenes, latents.clone(), steps=steps, guidance_scale=guidance_scale, batch=batch)
    torch_pipeline = StableDiffusionXLPipeline.from_pretrained(spec.root, torch_dtype=torch.float32)
    torch_pipeline.set_progress_bar_config(disable=True)
    torch_images = draw_all(
        torch_pipeline, scenes, latents.clone(), steps=steps, guidance_scale=guidance_scale, batch=batch
    )
    onnx_score, torch_score = score(onnx_images, scenes), score(torch_images, scenes)
    gap = abs(onnx_score.colour_and_shape - torch_score.colour_and_shape)
    return {
        "prompts": len(scenes),
        "steps": steps,
        "guidance_scale": guidance_scale,
        "onnx": dataclasses.asdict(onnx_score),
        "pytorch": dataclasses.asdict(torch_score),
        "gap_points": round(gap, 1),
        "passed": onnx_score.colour_and_shape >= PASS_SCORE and gap <= MAX_GAP,
        "images": onnx_images,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models_dir", type=Path, default=Path("models"))
    parser.add_argument("--cache_dir", type=Path, default=Path("cache"))
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=7.0)
    args = parser.parse_args(argv)
    report = run(args.models_dir, args.cache_dir, steps=args.steps, guidance_scale=args.guidance_scale)
    report.pop("images")
    print(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
