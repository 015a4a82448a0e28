"""Which part of --cfg_cutoff's per-batch CUDA graphs gave NaN images (session 23): the UNet of a CUDA build pinned
to one batch, with its own and with shared weights (``shared_initializers``), with and without a CUDA graph, through
the tool's runner, and in BatchGraphs' order (a batch's session made after the other's graph was captured). Prints
the mean |output| and the NaN count of three runs per case.

    python bench/experiments/shared_weights_check.py models/optimized/tiny-<hash> [batch]
"""

import json
import sys
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_DIR))


def _runs(run) -> list[tuple[float, int]]:
    """Mean |output| and NaN count of three calls of ``run`` (it returns the output tensor)."""
    import torch

    out = []
    for _ in range(3):
        output = run().float()
        torch.cuda.synchronize()
        out.append((round(float(output.abs().mean()), 5), int(torch.isnan(output).sum())))
    return out


def main() -> None:
    import numpy as np
    import onnxruntime as ort
    import torch

    ort.preload_dlls()
    from sd_utils.runtime.cuda_graph import (
        CudaGraphRunner,
        _Bound,
        cuda_graph_session,
        shared_initializers,
        take_shared_weights,
        unet_output_shapes,
    )
    from sd_utils.runtime.providers import PROVIDERS, session_options, share_arena

    folder = Path(sys.argv[1])
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    provider = PROVIDERS["cuda"]
    share_arena(provider)
    model = folder / "unet" / "model.onnx"
    _tensors, values = shared_initializers(model, "cuda:0")  # the tensors live as long as the sessions
    probe = ort.InferenceSession(str(model), providers=["CUDAExecutionProvider"])  # fused CUDA ops
    rng = np.random.default_rng(0)
    dims = {}
    feeds = {}
    for meta in probe.get_inputs():
        shape = [batch if not isinstance(d, int) and str(d).endswith("_batch") else d for d in meta.shape]
        shape = [d if isinstance(d, int) else 16 for d in shape]
        for d, v in zip(meta.shape, shape, strict=True):
            if not isinstance(d, int):
                dims[d] = v
        feeds[meta.name] = rng.random(shape)
    half = {k: v[: batch // 2] if np.ndim(v) and len(v) == batch else v for k, v in feeds.items()}
    on_gpu = [
        {
            k: torch.as_tensor(v, dtype=torch.int64 if v.dtype == np.int64 else torch.float32).cuda()
            for k, v in f.items()
        }
        for f in (feeds, half)
    ]

    def graph_runner(options) -> CudaGraphRunner:
        session, stream = cuda_graph_session(
            model, device_id=0, sess_options=options, extra_options=dict(provider.options)
        )
        return CudaGraphRunner(session, stream, output_shapes=unet_output_shapes(4))

    for shared in (False, True):
        for graph in (False, True):
            options = session_options(provider, dims)
            take_shared_weights(options, values if shared else {})
            cuda = dict(provider.options) | {"device_id": "0"} | ({"enable_cuda_graph": "1"} if graph else {})
            session = ort.InferenceSession(str(model), options, providers=[("CUDAExecutionProvider", cuda)])
            bound = _Bound(session, feeds, unet_output_shapes(4), 0)
            bound.load(feeds)
            torch.cuda.synchronize()

            def run(session=session, bound=bound):
                session.run_with_iobinding(bound.binding)
                return bound.outputs[0]

            print(json.dumps({"shared": shared, "graph": graph, "runs": _runs(run), "n_shared": len(values)}))
            del session, bound, run
    for shared in (False, True):  # the tool's runner: its own CUDA stream, torch tensors in and out
        options = session_options(provider, dims)
        take_shared_weights(options, values if shared else {})
        runner = graph_runner(options)
        print(json.dumps({"runner": True, "shared": shared, "runs": _runs(lambda r=runner: r(on_gpu[0])[0])}))
        del runner
    # BatchGraphs' order: batch A made and run (graph captured), then batch B made and run, then A and B again; B's
    # own weights in the shared arena (ORT's default) or outside it (use_device_allocator_for_initializers, the tool's)
    for outside in ("0", "1"):
        runners = {}
        for size, these in ((batch, on_gpu[0]), (batch // 2, on_gpu[1]), (batch, on_gpu[0]), (batch // 2, on_gpu[1])):
            if size not in runners:
                options = session_options(provider, {k: size if k.endswith("_batch") else v for k, v in dims.items()})
                options.add_session_config_entry("session.use_device_allocator_for_initializers", outside)
                take_shared_weights(options, values)
                runners[size] = graph_runner(options)
            runs = _runs(lambda r=runners[size], these=these: r(these)[0])
            print(json.dumps({"lazy_pair": size, "initializers_outside_arena": outside, "runs": runs}))


if __name__ == "__main__":
    main()
