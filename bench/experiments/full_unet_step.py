"""One step of the optimized full-size UNet on CPU against diffusers PyTorch on the same weights.

    python bench/experiments/full_unet_step.py --model_dir models/builtin/random-sdxl-base \
        --onnx_dir models/optimized/random-sdxl-base [--size 512]

ONNX Runtime first, then PyTorch (fp32, the classic attention the export uses), never both in memory: each holds the
UNet's 10 GB of fp32 weights. Prints one JSON document with both latencies, the peak RSS and the output difference.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import psutil

PROJECT_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_DIR))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, type=Path, help="diffusers folder (the PyTorch weights)")
    parser.add_argument("--onnx_dir", required=True, type=Path, help="optimized ONNX pipeline folder (--provider cpu)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)

    import onnxruntime as ort
    import torch

    from sd_utils.optimize.export_models import load_submodel
    from sd_utils.sources.model_spec import ModelSpec, Shape, submodel_io

    spec = ModelSpec.from_folder(args.model_dir)
    contract = submodel_io(spec, "unet")
    torch.manual_seed(0)
    inputs = contract.dummy_inputs(Shape(batch=args.batch, height=args.size, width=args.size))
    feeds = {name: tensor.numpy() for name, tensor in zip(contract.input_names, inputs, strict=True)}
    report = {"size": args.size, "inputs": {name: list(value.shape) for name, value in feeds.items()}}

    started = time.perf_counter()
    session = ort.InferenceSession(str(args.onnx_dir / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    report["ort_load_s"] = round(time.perf_counter() - started, 1)
    session.run(None, feeds)  # warm-up
    started = time.perf_counter()
    (ort_out,) = session.run(None, feeds)
    report["ort_step_s"] = round(time.perf_counter() - started, 2)
    del session

    module = load_submodel("unet", args.model_dir).float()
    torch.set_num_threads(psutil.cpu_count())
    with torch.inference_mode():
        started = time.perf_counter()
        torch_out = module(*inputs).numpy()
        report["torch_step_s"] = round(time.perf_counter() - started, 2)
    del module

    difference = np.abs(ort_out.astype(np.float64) - torch_out)
    report.update(
        max_abs_diff=float(difference.max()),
        mean_abs_diff=float(difference.mean()),
        output_abs_max=float(np.abs(torch_out).max()),
        output_std=float(torch_out.std()),
        finite=bool(np.isfinite(ort_out).all()),
        peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),  # ru_maxrss is in KiB
    )
    report["match"] = report["finite"] and report["max_abs_diff"] <= 1e-3 * max(1.0, report["output_abs_max"])
    print(json.dumps(report, indent=2))
    return 0 if report["match"] else 1


if __name__ == "__main__":
    sys.exit(main())
