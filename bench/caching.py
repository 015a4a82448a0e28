"""Less work per image: what ``--cfg_cutoff`` costs in quality and saves in time.

    python bench/caching.py quality [--models_dir models] [--cache_dir cache] [--steps 25] [--cutoffs 0.6,0.8]
    python bench/caching.py speed --model_id random-sdxl-base [--models_dir models] [--provider cpu]
                                  [--size 1024] [--steps_list 20,30] [--cutoffs 0.6,0.8] [--repeats 2]
                                  [--tiny_vae_steps 4] [--batches 2,4,8]

``quality``: the demo model's 96 captions (``sd_utils.demo_model``: its judge reads colour, shape and position back
from each image), drawn by the optimized ONNX pipeline with guidance throughout and with each cut-off, from the same
latents; per case the judge's score and the PSNR / SSIM of its images to the uncut ones.
``speed``: seconds per image through the tool's own run (``app.Generator``), guidance throughout and with each
cut-off, after a warm-up image; one JSON line per case; with ``--tiny_vae_steps``, also few-step images at guidance 0
with the model's VAE and with an ``AutoencoderTiny`` of TAESD-XL's architecture (random weights, written first);
with ``--batches``, throughput at the first ``--steps_list`` count and ``--batch_guidance`` (MLPerf's SDXL setting:
20 Euler steps, guidance 8) for each batch size (images per pipeline call), the cut-offs at the largest one only.
DeepCache-style caching (``--cache_interval``) is not built yet: its rows are missing here.
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

import numpy as np

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))


def _ssim(reference: np.ndarray, images: np.ndarray) -> float | None:
    try:
        import torch
        from torchmetrics.functional.image import structural_similarity_index_measure
    except ImportError:
        return None
    as_tensor = [torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255 for array in (images, reference)]
    return round(float(structural_similarity_index_measure(*as_tensor, data_range=1.0)), 4)


def _psnr(reference: np.ndarray, images: np.ndarray) -> float:
    mse = float(np.mean((reference.astype(np.float64) - images.astype(np.float64)) ** 2))
    return round(10 * np.log10(255**2 / mse), 2) if mse else float("inf")


def quality(args) -> None:
    from sd_utils.demo_model import quality as demo
    from sd_utils.demo_model import shapes
    from sd_utils.generation.cfg_cutoff import drop_guidance
    from sd_utils.runtime.pipeline import load_pipeline
    from sd_utils.runtime.providers import PROVIDERS
    from sd_utils.sources.model_spec import Shape

    scenes = list(shapes.ALL_SCENES)
    folder, spec = demo.optimized_demo(Path(args.models_dir), Path(args.cache_dir))
    latents = demo.starting_latents(len(scenes), spec)
    shape = Shape(batch=16, height=shapes.SIZE, width=shapes.SIZE, free_batch=True)
    pipeline = load_pipeline(folder, spec, provider=PROVIDERS["cpu"], shape=shape, model_label="demo").pipeline
    pipeline.set_progress_bar_config(disable=True)
    reference = None
    for cutoff in [1.0, *(float(value) for value in args.cutoffs.split(","))]:

        def cut(pipe, step, timestep, tensors, cutoff=cutoff):
            return drop_guidance(pipe, step, cutoff, tensors)

        extra = {"callback_on_step_end": cut, "callback_on_step_end_tensor_inputs": pipeline._callback_tensor_inputs}
        started = time.perf_counter()
        images = demo.draw_all(
            pipeline, scenes, latents.clone(), steps=args.steps, guidance_scale=args.guidance_scale, batch=16, **extra
        )
        seconds = time.perf_counter() - started
        reference = images if reference is None else reference
        row = {"cfg_cutoff": cutoff, "score": dataclasses.asdict(demo.score(images, scenes))}
        row["score"].pop("misses")
        row.update(psnr_db=_psnr(reference, images), ssim=_ssim(reference, images), seconds=round(seconds, 1))
        print(json.dumps({**row, "prompts": len(scenes), "steps": args.steps, "guidance": args.guidance_scale}))


def _random_tiny_vae(folder: Path) -> Path:
    """An ``AutoencoderTiny`` of TAESD-XL's architecture (diffusers' defaults) with random weights: its speed."""
    from diffusers import AutoencoderTiny

    if not (folder / "config.json").is_file():
        AutoencoderTiny().save_pretrained(folder, safe_serialization=True)
    return folder


def speed(args) -> None:
    """Guidance 7 with each cut-off at ``--steps_list``; then, with ``--tiny_vae_steps``, few-step images at guidance
    0 with the model's VAE and with a tiny one."""
    cutoffs = [float(value) for value in args.cutoffs.split(",") if value]
    for steps in (int(value) for value in args.steps_list.split(",") if value):
        for cutoff in [1.0, *cutoffs] if args.baseline else cutoffs:
            _speed_case(args, steps=steps, cutoff=cutoff, guidance=7.0, vae=None)
            gc.collect()  # the case's sessions go before the next case's come (two full-size UNets do not fit)
    if args.tiny_vae_steps:
        tiny = str(_random_tiny_vae(Path(args.models_dir) / "taesdxl-random"))
        for steps in (int(value) for value in args.tiny_vae_steps.split(",")):
            for vae in (None, tiny) if args.baseline else (tiny,):
                _speed_case(args, steps=steps, cutoff=1.0, guidance=0.0, vae=vae)
                gc.collect()
    batches = [int(value) for value in args.batches.split(",") if value]
    for batch in batches:
        for cutoff in [1.0, *(cutoffs if batch == max(batches) else [])]:
            steps = int(args.steps_list.split(",")[0])
            _speed_case(args, steps=steps, cutoff=cutoff, guidance=args.batch_guidance, vae=None, batch=batch)
            gc.collect()


def _kept(image, output_dir: Path, index: int, seed: int, metadata) -> Path:
    """The images stay in memory: a 1024² PNG's encoding on the host is no part of the pipeline's time."""
    return Path(output_dir) / f"{index:05d}-{seed}.png"


def _speed_case(args, *, steps: int, cutoff: float, guidance: float, vae: str | None, batch: int = 1) -> None:
    from sd_utils import app
    from sd_utils.options import parse_options

    with tempfile.TemporaryDirectory() as scratch:
        argv = ["--model_id", args.model_id, "--provider", args.provider, "--models_dir", args.models_dir]
        argv += ["--cache_dir", args.cache_dir, "--output_dir", scratch, "--prompt", "a lighthouse at dusk"]
        argv += ["--image_size", str(args.size), "--num_inference_steps", str(steps), "--seed", "1"]
        argv += ["--guidance_scale", str(guidance), "--cfg_cutoff", str(cutoff), *(["--vae", vae] if vae else [])]
        argv += ["--batch_size", str(batch), "--num_images", str(batch)]
        options = parse_options(argv)
        job = app.plan(options)
        generator = app.Generator(options, job, app.prepare_models(options, job))
        generator.generate(job.request, saver=_kept)  # warm-up: sessions made
        seconds = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            generator.generate(job.request, saver=_kept)
            seconds.append(time.perf_counter() - started)
    row = {
        "cfg_cutoff": cutoff,
        "steps": steps,
        "guidance": guidance,
        "batch": batch,
        "s_per_image": round(statistics.median(seconds) / batch, 4),
        "images_per_s": round(batch / statistics.median(seconds), 3),
    }
    row.update(vae="tiny (TAESD-XL architecture, random)" if vae else "the model's", model=args.model_id)
    print(
        json.dumps(
            {**row, "runs": [round(value, 3) for value in seconds], "size": args.size, "provider": args.provider}
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("quality", "speed"))
    parser.add_argument("--model_id", default="tiny")
    parser.add_argument("--models_dir", default="models")
    parser.add_argument("--cache_dir", default="cache")
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=25, help="quality: denoising steps")
    parser.add_argument("--steps_list", default="20,30", help="speed: denoising steps of each case")
    parser.add_argument("--guidance_scale", type=float, default=7.0)
    parser.add_argument("--cutoffs", default="0.6,0.8")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no_baseline", dest="baseline", action="store_false", help="speed: skip the uncut rows")
    parser.add_argument("--tiny_vae_steps", default="", help="speed: also these step counts with a tiny VAE, e.g. 4")
    parser.add_argument("--batches", default="", help="speed: throughput at these batch sizes, e.g. 1,2,4,8")
    parser.add_argument("--batch_guidance", type=float, default=8.0, help="speed: the batch rows' guidance scale")
    args = parser.parse_args()
    quality(args) if args.mode == "quality" else speed(args)


if __name__ == "__main__":
    main()
