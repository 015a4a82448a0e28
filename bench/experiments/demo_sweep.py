"""Which demo-model training recipe learns fastest? Train the base UNet under several settings and score each.

    python bench/experiments/demo_sweep.py --device cuda \
        --variants "default:;plain:unet_snr_gamma=0;short:unet_steps=3000"

Each variant (``name:key=value,...``: changes to ``sd_utils.demo_model.train.SETTINGS``) trains a fresh base UNet in
its own process, all variants at once, against the shipped VAE (the VAE is not what is compared), then draws the 96
scenes with the diffusers PyTorch pipeline on ``--device`` and scores them with the quality check's judge. Prints
one JSON document: per variant its settings, UNet samples seen, training time, final loss and score. The ONNX side
of the quality check is left out: its score equals PyTorch's (bench/NOTES.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_DIR))

from sd_utils.demo_model import quality, shapes, train  # noqa: E402


def parse_overrides(chunk: str) -> tuple[str, dict]:
    """``name:key=value,...`` -> (name, settings)."""
    name, _, text = chunk.partition(":")
    try:
        return name, {**train.SETTINGS, **dict(train.parse_setting(item) for item in filter(None, text.split(",")))}
    except KeyError as error:
        raise SystemExit(f"--variants {chunk}: {error.args[0]}") from None


def run_variant(name: str, settings: dict, *, device: str, steps: int, guidance_scale: float) -> dict:
    import torch

    from sd_utils.sources.builder import ARCHITECTURES, build_pipeline

    torch.manual_seed(settings["seed"])
    torch.use_deterministic_algorithms(True, warn_only=True)
    generator = torch.Generator().manual_seed(settings["seed"])
    pixels, scenes = train.training_images(settings)
    pipeline = build_pipeline(ARCHITECTURES["demo"], seed=settings["seed"], trained=True)  # the shipped VAE
    pipeline.unet = build_pipeline(ARCHITECTURES["demo"], seed=settings["seed"], trained=False).unet
    latents = train.latent_means(pipeline.vae, pixels, "cpu") * pipeline.vae.config.scaling_factor
    report = train.train_base_unet(pipeline, latents, scenes, settings, device, generator, what=name)
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    everything = list(shapes.ALL_SCENES)
    start = quality.starting_latents(len(everything), _spec())
    drawn = quality.draw_all(pipeline, everything, start, steps=steps, guidance_scale=guidance_scale, batch=96)
    judged = quality.score(drawn, everything)
    return {
        "variant": name,
        "settings": settings,
        "unet_samples": settings["unet_steps"] * settings["unet_batch"],
        **report,
        "score": {key: value for key, value in dataclasses.asdict(judged).items() if key != "misses"},
    }


def _spec():
    from sd_utils.sources.models import resolve_model

    return resolve_model("demo", models_dir=PROJECT_DIR / "models").spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", required=True, help="name:key=value,...;name:...")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=9.0)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a worker: run this one variant, print its JSON
    args = parser.parse_args(argv)

    variants = dict(parse_overrides(chunk) for chunk in filter(None, args.variants.split(";")))
    if args.one:
        result = run_variant(
            args.one, variants[args.one], device=args.device, steps=args.steps, guidance_scale=args.guidance_scale
        )
        print(json.dumps(result))
        return 0

    started = time.perf_counter()
    workers = {
        name: subprocess.Popen(
            [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--one", name],
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in variants
    }
    results = []
    for name, worker in workers.items():
        out, _ = worker.communicate()
        lines = out.strip().splitlines()
        results.append(json.loads(lines[-1]) if worker.returncode == 0 and lines else {"variant": name, "failed": True})
    print(
        json.dumps(
            {"device": args.device, "wall_s": round(time.perf_counter() - started, 1), "runs": results}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
