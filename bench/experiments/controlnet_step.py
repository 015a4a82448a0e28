"""A ControlNet's cost per step at the session level: the build's plain UNet against a ControlNet + the UNet that
takes its residuals, batch 2, 512², random inputs, CPU (bench/controlnet.py measures it through the pipeline, but
needs the build's unoptimized half too). Builds the ControlNet first (a random one from the model's UNet).

    python bench/experiments/controlnet_step.py --models_dir /work/bench-models [--model_id random-sdxl-base]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_DIR))
sys.path.insert(0, str(PROJECT_DIR / "tests"))


def _timed(step, repeats: int = 3) -> list[float]:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(round(time.perf_counter() - started, 2))
    return times


def main() -> None:
    import numpy as np
    import onnxruntime as ort

    from sd_utils.optimize.controlnets import controlnet_build
    from sd_utils.optimize.recipe import BuildRecipe
    from sd_utils.runtime.providers import PROVIDERS
    from sd_utils.sources.controlnet import resolve_controlnet
    from sd_utils.sources.model_spec import control_io_names
    from sd_utils.sources.models import resolve_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models_dir", type=Path, required=True)
    parser.add_argument("--model_id", default="random-sdxl-base")
    args = parser.parse_args()
    model = resolve_model(args.model_id, models_dir=args.models_dir)
    build = BuildRecipe.of(model, provider="cpu").paths(args.models_dir).optimized
    source_dir = args.models_dir / "controlnet-src"
    if not (source_dir / "config.json").is_file():
        from lora_files import write_controlnet

        write_controlnet(model.spec.root, source_dir)
        gc.collect()
    source = resolve_controlnet(str(source_dir), 1.0, base=model.spec, models_dir=args.models_dir)
    built = controlnet_build(source, model, PROVIDERS["cpu"], models_dir=args.models_dir, tempdir=None)
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal((2, 4, 64, 64), dtype=np.float32),
        "timestep": np.array(500, np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 2048), dtype=np.float32),
        "text_embeds": rng.standard_normal((2, 1280), dtype=np.float32),
        "time_ids": rng.standard_normal((2, 6), dtype=np.float32),
    }
    control = {**feeds, "controlnet_cond": rng.random((2, 3, 512, 512), dtype=np.float32)}
    control["conditioning_scale"] = np.array(1.0, np.float32)
    down, mid = control_io_names(model.spec)
    cpu = ["CPUExecutionProvider"]
    for case in ("plain", "controlnet", "plain", "controlnet"):
        if case == "plain":
            unet = ort.InferenceSession(str(build / "unet" / "model.onnx"), providers=cpu)
            times = _timed(lambda unet=unet: unet.run(None, feeds))
        else:
            unet = ort.InferenceSession(str(build / "unet_controlnet" / "model.onnx"), providers=cpu)
            net = ort.InferenceSession(str(built / "controlnet" / "model.onnx"), providers=cpu)

            def step(unet=unet, net=net):
                residuals = net.run(None, control)
                unet.run(None, {**feeds, **dict(zip(down, residuals[:-1], strict=True)), mid: residuals[-1]})

            times = _timed(step)
        unet = net = None
        gc.collect()
        print(json.dumps({"case": case, "step_s": times}), flush=True)


if __name__ == "__main__":
    main()
