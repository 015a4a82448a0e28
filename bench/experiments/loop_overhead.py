"""Where the denoising loop's time per step goes on CUDA, beside the UNet's replay: the tool's pipeline (UNet as a
CUDA graph), its UNet call timed from inside the loop, and the replay alone in three ways.

    python bench/experiments/loop_overhead.py --model_dir <builtin model> --onnx_dir <cuda build> [--size 1024]

Prints one JSON line (ms):
* ``loop_step_ms``: the cost of one more step (the call at 30 steps less the call at 10, over 20);
* ``in_unet_ms`` / ``outside_unet_ms``: host time per step inside the UNet's call (the runner: input copies, ORT's
  run, which waits for the replay) and outside it (diffusers' loop and the scheduler), from the 30-step call;
* ``runner_ms``: the runner called back to back on the loop's last feeds; ``run_ms``: ORT's ``run_with_iobinding``
  alone back to back; ``run_nosync_host_ms`` / ``run_nosync_ms``: the same with the run option
  ``disable_synchronize_execution_providers=1``, host time of the call and time to the device's end.
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
sys.path.insert(0, str(PROJECT_DIR / "bench"))  # benchmark's timing helpers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, type=Path)
    parser.add_argument("--onnx_dir", required=True, type=Path)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()

    import onnxruntime as ort
    import torch
    from benchmark import _median_ms, _medians_ms, loop_split

    from sd_utils.runtime import optimum_adapter
    from sd_utils.runtime.pipeline import load_pipeline
    from sd_utils.runtime.providers import PROVIDERS
    from sd_utils.sources.model_spec import ModelSpec, Shape

    ort.preload_dlls()
    spec = ModelSpec.from_folder(args.model_dir)
    shape = Shape(batch=1, height=args.size, width=args.size)
    loaded = load_pipeline(args.onnx_dir, spec, provider=PROVIDERS["cuda"], shape=shape, model_label="loop")
    pipe, runner = loaded.pipeline, loaded.unet_graph
    pipe.set_progress_bar_config(disable=True)
    sync = torch.cuda.synchronize
    inside: list[float] = []
    last: dict = {}

    def timed(feeds):
        last.update(feeds)
        started = time.perf_counter()
        out = runner(feeds)[0]
        inside.append(time.perf_counter() - started)
        return out

    optimum_adapter.set_unet_forward(pipe, timed)
    call = dict(height=args.size, width=args.size, output_type="latent", guidance_scale=7.0)

    def denoise(steps: int) -> None:
        inside.clear()
        pipe("a photo", num_inference_steps=steps, **call)

    calls = _medians_ms({30: lambda: denoise(30), 10: lambda: denoise(10)}, warmup=1, runs=3, synchronize=sync)
    row = {"loop_step_ms": loop_split(calls[30], 30, calls[10], 10)["loop_step_ms"]}
    denoise(30)
    sync()
    in_unet = statistics.median(inside) * 1000
    row["in_unet_ms"] = round(in_unet, 3)
    row["outside_unet_ms"] = round(calls[30] / 30 - in_unet, 3)

    feeds = {name: value.clone() if isinstance(value, torch.Tensor) else value for name, value in last.items()}
    row["runner_ms"] = _median_ms(lambda: runner(feeds), warmup=3, runs=20, synchronize=sync)
    binding = runner._bound.binding
    row["run_ms"] = _median_ms(lambda: runner.session.run_with_iobinding(binding), warmup=3, runs=20, synchronize=sync)
    options = runner._run_options  # the runner's own: disable_synchronize_execution_providers=1
    host: list[float] = []

    def nosync():
        started = time.perf_counter()
        runner.session.run_with_iobinding(binding, options)
        host.append(time.perf_counter() - started)

    row["run_nosync_ms"] = _median_ms(nosync, warmup=3, runs=20, synchronize=sync)
    row["run_nosync_host_ms"] = round(statistics.median(host) * 1000, 3)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
