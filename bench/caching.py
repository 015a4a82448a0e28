"""Less work per image: what ``--cfg_cutoff`` and ``--cache_interval`` (DeepCache) cost in quality and save in time.

    python bench/caching.py quality [--models_dir models] [--cache_dir cache] [--steps 25] [--cutoffs 0.6,0.8]
                                    [--intervals 2,3]
    python bench/caching.py speed --model_id random-sdxl-base [--models_dir models] [--provider cpu]
                                  [--size 1024] [--steps_list 20,30] [--cutoffs 0.6,0.8] [--intervals 2,3] [--repeats 2]
                                  [--tiny_vae_steps 4] [--batches 2,4,8]

The cases: off, each cut-off, each interval, and both (the lowest cut-off with the largest interval).
``quality``: the demo model's 96 captions (``sd_utils.demo_model``: its judge reads colour, shape and position back
from each image), drawn by the optimized ONNX pipeline in each case from the same latents; per case the judge's score
and the PSNR / SSIM of its images to those of the first case (off).
``speed``: seconds per image through the tool's own run (``app.Generator``) per case, after a warm-up image; one
JSON line per case (``--parallel_builds``: the builds first, see bench/parallel_builds.py); with ``--tiny_vae_steps``,
also few-step images at guidance 0 with the model's VAE and with an ``AutoencoderTiny`` of TAESD-XL's architecture
(random weights, written first); with ``--batches``, throughput at ``--batch_steps`` and ``--batch_guidance``
(MLPerf's SDXL setting: 20 Euler steps, guidance 8) for each batch size (images per pipeline
call), every case at the largest one, only "off" at the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
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


def _cases(args) -> list[tuple[float, int]]:
    """(cut-off, cache interval) of every case: off, each cut-off, each interval, and both (the lowest cut-off with
    the largest interval)."""
    if args.cases:  # F:N,... as given
        return [(float(case.split(":")[0]), int(case.split(":")[1])) for case in args.cases.split(",")]
    cutoffs = [float(value) for value in args.cutoffs.split(",") if value]
    intervals = [int(value) for value in args.intervals.split(",") if value]
    cases = [(1.0, 1)] if args.baseline else []
    cases += [(cutoff, 1) for cutoff in cutoffs] + [(1.0, interval) for interval in intervals]
    return cases + ([(min(cutoffs), max(intervals))] if cutoffs and intervals else [])


def quality(args) -> None:
    from sd_utils.demo_model import quality as demo
    from sd_utils.demo_model import shapes
    from sd_utils.generation.cfg_cutoff import drop_guidance
    from sd_utils.runtime.pipeline import load_pipeline
    from sd_utils.runtime.providers import PROVIDERS
    from sd_utils.sources.model_spec import Shape

    scenes = list(shapes.ALL_SCENES)
    folder, spec = demo.optimized_demo(Path(args.models_dir), Path(args.cache_dir), "--cache_interval", "2")
    latents = demo.starting_latents(len(scenes), spec)
    shape = Shape(batch=16, height=shapes.SIZE, width=shapes.SIZE, free_batch=True)
    cpu = PROVIDERS["cpu"]
    loaded = {
        cached: load_pipeline(folder, spec, provider=cpu, shape=shape, model_label="demo", deep_cache=cached)
        for cached in (False, True)
    }
    reference = None
    for cutoff, interval in _cases(args):
        pipeline = loaded[interval > 1].pipeline
        pipeline.set_progress_bar_config(disable=True)

        def cut(pipe, step, timestep, tensors, cutoff=cutoff):
            return drop_guidance(pipe, step, cutoff, tensors)

        def call(*, pipeline=pipeline, cache=loaded[interval > 1].unet_cache, interval=interval, **arguments):
            if cache is not None:
                cache.start(interval)  # each call's first step refreshes the cache, as the tool's run does
            return pipeline(**arguments)

        extra = {"callback_on_step_end": cut, "callback_on_step_end_tensor_inputs": pipeline._callback_tensor_inputs}
        started = time.perf_counter()
        images = demo.draw_all(
            call, scenes, latents.clone(), steps=args.steps, guidance_scale=args.guidance_scale, batch=16, **extra
        )
        seconds = time.perf_counter() - started
        reference = images if reference is None else reference
        row = {"cfg_cutoff": cutoff, "cache_interval": interval}
        row["score"] = dataclasses.asdict(demo.score(images, scenes))
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
    """Guidance 7 in every case of :func:`_cases` at ``--steps_list``; then, with ``--tiny_vae_steps``, few-step
    images at guidance 0 with the model's VAE and with a tiny one; then ``--batches``."""
    if args.parallel_builds:
        sys.path.insert(0, str(PROJECT_DIR / "bench"))
        from parallel_builds import build_in_parallel

        build_in_parallel(args, ("unet_refresh", "unet_shallow") if args.intervals else ())
    for steps in (int(value) for value in args.steps_list.split(",") if value):
        for cutoff, interval in _cases(args):
            _in_own_process(args, steps=steps, cutoff=cutoff, interval=interval, guidance=7.0, vae=None)
    if args.tiny_vae_steps:
        tiny = str(_random_tiny_vae(Path(args.models_dir) / "taesdxl-random"))
        for steps in (int(value) for value in args.tiny_vae_steps.split(",")):
            for vae in (None, tiny) if args.baseline else (tiny,):
                _in_own_process(args, steps=steps, cutoff=1.0, interval=1, guidance=0.0, vae=vae)
    batches = [int(value) for value in args.batches.split(",") if value]
    for batch in batches:
        for cutoff, interval in _cases(args) if batch == max(batches) else [(1.0, 1)]:
            case = dict(cutoff=cutoff, interval=interval, guidance=args.batch_guidance, vae=None, batch=batch)
            _in_own_process(args, steps=args.batch_steps, **case)


def _kept(image, output_dir: Path, index: int, seed: int, metadata) -> Path:
    """The images stay in memory: a 1024² PNG's encoding on the host is no part of the pipeline's time."""
    return Path(output_dir) / f"{index:05d}-{seed}.png"


def _in_own_process(args, **case) -> None:
    """:func:`_speed_case` in a fresh process: two full-size pipelines do not fit this machine's memory, and one
    process did not give all of a released pipeline's memory back (a second full-size case was OOM-killed)."""
    worker = multiprocessing.get_context("spawn").Process(target=_speed_case, args=(args,), kwargs=case)
    worker.start()
    worker.join()
    if worker.exitcode:
        print(json.dumps({**case, "error": f"the case's process ended with {worker.exitcode}"}), flush=True)


def _speed_case(
    args, *, steps: int, cutoff: float, interval: int, guidance: float, vae: str | None, batch: int = 1
) -> None:
    from sd_utils import app
    from sd_utils.options import parse_options

    with tempfile.TemporaryDirectory() as scratch:
        argv = ["--model_id", args.model_id, "--provider", args.provider, "--models_dir", args.models_dir]
        argv += ["--cache_dir", args.cache_dir, "--output_dir", scratch, "--prompt", "a lighthouse at dusk"]
        argv += ["--image_size", str(args.size), "--num_inference_steps", str(steps), "--seed", "1"]
        argv += ["--guidance_scale", str(guidance), "--cfg_cutoff", str(cutoff), *(["--vae", vae] if vae else [])]
        argv += ["--batch_size", str(batch), "--num_images", str(batch), "--cache_interval", str(interval)]
        options = parse_options(argv)
        job = app.plan(options)
        generator = app.Generator(options, job, app.prepare_models(options, job))
        # the same image first: every session made and its CUDA graph captured (ONNX Runtime captures on a session's
        # second run: a 2-step warm-up ran --cfg_cutoff's second batch, or DeepCache's graphs at it, only once)
        generator.generate(job.request, saver=_kept)
        seconds = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            generator.generate(job.request, saver=_kept)
            seconds.append(time.perf_counter() - started)
    row = {
        "cfg_cutoff": cutoff,
        "cache_interval": interval,
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
    parser.add_argument("--intervals", default="2,3", help="--cache_interval values (DeepCache)")
    parser.add_argument("--cases", default="", help="instead: these cases, cut-off:interval, e.g. 1:3,0.6:3")
    parser.add_argument(
        "--parallel_builds", action="store_true", help="speed: the model's and DeepCache's builds in processes at once"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no_baseline", dest="baseline", action="store_false", help="speed: skip the uncut rows")
    parser.add_argument("--tiny_vae_steps", default="", help="speed: also these step counts with a tiny VAE, e.g. 4")
    parser.add_argument("--batches", default="", help="speed: throughput at these batch sizes, e.g. 1,2,4,8")
    parser.add_argument("--batch_guidance", type=float, default=8.0, help="speed: the batch rows' guidance scale")
    parser.add_argument("--batch_steps", type=int, default=20, help="speed: the batch rows' denoising steps")
    args = parser.parse_args()
    quality(args) if args.mode == "quality" else speed(args)


if __name__ == "__main__":
    main()
