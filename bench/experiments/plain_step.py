"""The UNet step of a CUDA build: static shapes vs a free batch (``--cfg_cutoff``'s sessions), with and without
CUDA graphs.

    python bench/experiments/plain_step.py --model_dir models/builtin/random-sdxl-base \
        --onnx_dir models/optimized/random-sdxl-base-<hash> [--size 1024] [--profile] [--variants ...]

Each variant makes its own session (the tool's CUDA provider options, IO binding to torch buffers) and prints one
JSON line: ms per step at batch 2 and 1 (and 2 again for a free batch; median of 10 after 3 warm-ups), the first
run after each change of batch apart (``..._first_ms``: a change's own cost, which the medians leave out), and the
mean of the output's magnitude (the variants should agree). Variants: ``static`` (a session per batch), ``free``
(the provider's options), ``free_batch_options`` (with the provider's options for a free batch, as the tool loads
--cfg_cutoff's UNet), ``free_graphs`` (a free batch replayed as one CUDA graph per batch in the same session: ONNX
Runtime's ``gpu_graph_id`` run option; tried in the tool for --cfg_cutoff and not kept: bench/NOTES.md, session 22),
``shared_graphs`` (a session per batch, each its own CUDA graph, on one copy of the weights: GPU memory per
session as well).
``--profile``: ORT's profile of the free-batch variants' runs without CUDA graphs (``free``,
``free_batch_options``), the 15 costliest op types per run (warm-ups included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_DIR))


def _bound(session, batch: int, dims: dict[str, int], latent_channels: int):
    """The session bound as the tool binds it (``cuda_graph._Bound``), its inputs random at ``batch``."""
    import numpy as np
    import torch

    from sd_utils.runtime.cuda_graph import _Bound, unet_output_shapes

    rng = np.random.default_rng(0)
    feeds = {
        meta.name: rng.random([batch if str(dim).endswith("_batch") else dims.get(dim, dim) for dim in meta.shape])
        for meta in session.get_inputs()
    }
    bound = _Bound(session, feeds, unet_output_shapes(latent_channels), device_id=0)
    bound.load(feeds)
    torch.cuda.synchronize()  # the copies ran on torch's stream, the session runs on one of ORT's
    return bound


def _time(session, bound, run_options=None, runs: int = 10) -> tuple[float, float, float]:
    """(ms of the first run, median ms of ``runs`` after 3 warm-ups, mean |output|)."""
    seconds = []
    for _ in range(1 + 3 + runs):
        started = time.perf_counter()
        session.run_with_iobinding(bound.binding, run_options)  # returns once the outputs are written
        seconds.append(time.perf_counter() - started)
    magnitude = float(bound.outputs[0].float().abs().mean())
    return round(seconds[0] * 1000, 2), round(statistics.median(seconds[4:]) * 1000, 2), round(magnitude, 5)


def _graph_run_options(batch: int):
    """Run options that replay (or first capture) the CUDA graph of ``batch``: ids from 1 (0 is ORT's own)."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", str(batch))
    return options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, type=Path)
    parser.add_argument("--onnx_dir", required=True, type=Path)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--variants", default="static,free_batch_options,free_graphs")
    args = parser.parse_args()

    import onnxruntime as ort
    import torch  # noqa: F401  (CUDA libraries first)

    ort.preload_dlls()
    from sd_utils.runtime.providers import PROVIDERS, session_options, share_arena
    from sd_utils.sources.model_spec import ModelSpec, Shape, free_dimension_overrides

    provider = PROVIDERS["cuda"]
    spec = ModelSpec.from_folder(args.model_dir)
    dims = free_dimension_overrides(spec, Shape(batch=1, height=args.size, width=args.size))
    share_arena(provider)
    model = str(args.onnx_dir / "unet" / "model.onnx")
    for variant in args.variants.split(","):
        if variant == "shared_graphs":
            print(json.dumps(_shared_graphs(model, provider, dims, spec.latent_channels)), flush=True)
            continue
        row = {"variant": variant}
        for batch in (2, 1) if variant == "static" else (None,):
            pinned = {k: v for k, v in dims.items() if not k.endswith("_batch")}
            pinned.update({k: batch for k in dims if k.endswith("_batch") and batch})
            options = session_options(provider, pinned)
            options.enable_profiling = args.profile and variant in ("free", "free_batch_options")
            cuda = dict(provider.options) | {"device_id": "0"}
            if variant == "free_batch_options":
                cuda |= dict(provider.free_batch_options)
            if variant == "free_graphs":
                cuda["enable_cuda_graph"] = "1"
            session = ort.InferenceSession(model, sess_options=options, providers=[("CUDAExecutionProvider", cuda)])
            bound = {}  # one binding per batch, as the tool's runners keep them
            for size in (batch,) if batch else (2, 1, 2):
                bound[size] = bound.get(size) or _bound(session, size, dims, spec.latent_channels)
                run_options = _graph_run_options(size) if variant == "free_graphs" else None
                first, median, magnitude = _time(session, bound[size], run_options)
                again = "_again" if f"batch{size}_ms" in row else ""
                row |= {f"batch{size}_ms{again}": median, f"batch{size}_first_ms{again}": first}
                row[f"batch{size}_output_mean_abs{again}"] = magnitude
            if options.enable_profiling:
                _top_ops(session.end_profiling())
            del session
        print(json.dumps(row), flush=True)


def _used_mb() -> float:
    import torch

    free, total = torch.cuda.mem_get_info(0)
    return round((total - free) / 2**20)


def _shared_graphs(model: str, provider, dims: dict, latent_channels: int) -> dict:
    """Batch 2 and batch 1 as two sessions, each replaying its own CUDA graph, both on one copy of the weights on
    the device (``add_initializer``): the GPU memory each session took, then the runs at batch 2, 1, 2."""
    import onnxruntime as ort

    from sd_utils.runtime.cuda_graph import shared_initializers, take_shared_weights
    from sd_utils.runtime.providers import session_options

    row = {"variant": "shared_graphs", "used_mb_before": _used_mb()}
    tensors, values = shared_initializers(Path(model), "cuda:0")
    row |= {"shared_initializers": len(values), "used_mb_weights": _used_mb()}
    sessions = {}
    for batch in (2, 1):
        options = session_options(provider, {k: batch if k.endswith("_batch") else v for k, v in dims.items()})
        take_shared_weights(options, values)  # as the tool's per-batch sessions take them
        cuda = dict(provider.options) | {"device_id": "0", "enable_cuda_graph": "1"}
        session = ort.InferenceSession(model, sess_options=options, providers=[("CUDAExecutionProvider", cuda)])
        sessions[batch] = (session, _bound(session, batch, dims, latent_channels))
        row[f"used_mb_session{batch}"] = _used_mb()
    for batch in (2, 1, 2):
        session, bound = sessions[batch]
        first, median, magnitude = _time(session, bound)
        again = "_again" if f"batch{batch}_ms" in row else ""
        row |= {f"batch{batch}_ms{again}": median, f"batch{batch}_first_ms{again}": first}
        row[f"batch{batch}_output_mean_abs{again}"] = magnitude
    row["used_mb_after_runs"] = _used_mb()
    del sessions, values, tensors
    return row


def _top_ops(profile_file: str) -> None:
    events = json.loads(Path(profile_file).read_text())
    totals: Counter = Counter()
    runs = 0
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"].get("op_name", "?")] += event["dur"]
        if event.get("name") == "model_run":
            runs += 1
    print(
        json.dumps(
            {
                "profile_runs": runs,
                "top_ops_ms_per_run": {op: round(us / 1000 / max(runs, 1), 2) for op, us in totals.most_common(15)},
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
