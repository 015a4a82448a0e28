"""The denoising UNet (and ControlNets) replayed as a CUDA graph (ONNX Runtime's CUDA EP ``enable_cuda_graph``).

ONNX Runtime captures the whole UNet on its first runs and replays it afterwards without launching its ~2,000
kernels one by one. That needs fixed device addresses for every input and output: :class:`CudaGraphRunner` allocates
them once, binds them once, and copies each call's tensors into them (device to device). Shapes must be static, which
the free-dimension overrides of ``load_pipeline`` guarantee, and every node must run on the CUDA EP (ONNX Runtime
refuses to create the session otherwise).

The session runs on a CUDA stream of our own (``user_compute_stream``), ordered against torch's stream with stream
waits, so the pipeline's tensors never need a device-wide synchronization. The host does not wait for the replay
either: the run option ``disable_synchronize_execution_providers`` leaves out the stream synchronization that ONNX
Runtime's CUDA EP does after each graph launch, so the scheduler's next step is queued while the UNet still runs and
the GPU goes from one step to the next without waiting for the host (bench/NOTES.md, session 24). The host then waits
for the previous replay only, so it is never more than one step ahead (progress and stop requests stay in step).

A batch that changes within a run (``--cfg_cutoff``: 2B images' worth with guidance, then B) gets a session per batch,
each replaying its own graph, all on one copy of the weights on the device (:class:`BatchGraphs`). One session that
replays a graph per batch (ORT's ``gpu_graph_id``) gave wrong images (bench/NOTES.md, session 22).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# ONNX tensor element types -> torch dtypes, for the session's inputs and output
TORCH_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}


def graph_provider_options(device_id: int, stream: int, extra_options: dict[str, str] | None) -> dict[str, str]:
    """The CUDA provider options of a graph-replaying session on CUDA stream handle ``stream``."""
    return {
        "device_id": str(device_id),
        "enable_cuda_graph": "1",
        "user_compute_stream": str(stream),
        **(extra_options or {}),
    }


def cuda_graph_session(
    onnx_file: Path, *, device_id: int, sess_options, extra_options: dict[str, str] | None = None
) -> tuple[Any, Any]:
    """(ORT session replaying ``onnx_file`` as a CUDA graph, the torch CUDA stream it runs on)."""
    import onnxruntime as ort
    import torch

    stream = torch.cuda.Stream(device=device_id)
    options = graph_provider_options(device_id, stream.cuda_stream, extra_options)
    session = ort.InferenceSession(
        str(onnx_file), sess_options=sess_options, providers=[("CUDAExecutionProvider", options)]
    )
    return session, stream


class _Bound:
    """A session's IO binding to CUDA buffers of one set of shapes (``feeds``'s and ``output_shapes(feeds)``): each
    call's inputs are copied into them (device to device), the outputs are written there."""

    def __init__(self, session, feeds: dict[str, Any], output_shapes: Callable, device_id: int):
        import torch

        device = torch.device("cuda", device_id)
        self.binding = session.io_binding()
        self.inputs: dict[str, Any] = {}
        self.outputs: list = []
        for meta in session.get_inputs():
            dtype = getattr(torch, TORCH_DTYPES[meta.type])
            buffer = torch.empty(tuple(np.shape(feeds[meta.name])), dtype=dtype, device=device)
            self.inputs[meta.name] = buffer
            self.binding.bind_input(
                meta.name, "cuda", device_id, _numpy_dtype(dtype), tuple(buffer.shape), buffer.data_ptr()
            )
        for meta, shape in zip(session.get_outputs(), output_shapes(feeds), strict=True):
            dtype = getattr(torch, TORCH_DTYPES[meta.type])
            buffer = torch.empty(tuple(shape), dtype=dtype, device=device)
            self.outputs.append(buffer)
            self.binding.bind_output(
                meta.name, "cuda", device_id, _numpy_dtype(dtype), tuple(buffer.shape), buffer.data_ptr()
            )

    def load(self, feeds: dict[str, Any]) -> None:
        """Queue the copies of ``feeds`` into the input buffers on torch's current stream (every input, every call: a
        tensor may be another session's output buffer, rewritten by ONNX Runtime without torch knowing)."""
        import torch

        for name, buffer in self.inputs.items():
            value = feeds[name]
            if not isinstance(value, torch.Tensor):
                value = torch.as_tensor(np.asarray(value))
            buffer.copy_(value.reshape(buffer.shape), non_blocking=True)


class CudaGraphRunner:
    """Runs a session made by :func:`cuda_graph_session` on fixed, once-bound CUDA buffers.

    ``output_shapes(feeds)`` gives the shape of each of the session's outputs, in order (static shapes: the first
    call's feeds fix them). ``__call__`` queues the replay and returns the output buffers themselves at once, ready for
    any later work queued on the caller's torch stream (the host reads them only through that stream); they are
    overwritten by the next call, which is what a denoising loop needs (the scheduler, or the UNet that takes a
    ControlNet's residuals, reads them before the next step).
    """

    def __init__(self, session, stream, *, output_shapes: Callable[[dict[str, Any]], list[tuple]], device_id: int = 0):
        import onnxruntime as ort

        self.session = session
        self.stream = stream
        self.device_id = device_id
        self.output_shapes = output_shapes
        self._bound: _Bound | None = None
        # (inputs copied, outputs written by this call's replay, by the previous call's): made once, recorded on
        # every call, the last two swapping places
        self._events: list | None = None
        # the replay is only queued: ``written`` orders what comes after it, so the host need not wait for it
        self._run_options = ort.RunOptions()
        self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")

    def __call__(self, feeds: dict[str, Any]) -> list:
        import torch

        if self._bound is None:
            self._bound = _Bound(self.session, feeds, self.output_shapes, self.device_id)
            self._events = [torch.cuda.Event(), torch.cuda.Event(), torch.cuda.Event()]
        copied, written, previous = self._events
        caller = torch.cuda.current_stream(self.device_id)
        # the caller's stream waited for the previous replay (below), so these copies cannot overtake it
        self._bound.load(feeds)
        copied.record(caller)
        self.stream.wait_event(copied)  # the replay starts after the copies
        self.session.run_with_iobinding(self._bound.binding, self._run_options)  # queued on self.stream
        written.record(self.stream)
        caller.wait_event(written)  # whatever the caller queues next sees the outputs
        # the host stays one replay ahead of the GPU, no more: this one is queued behind the previous, whose end it
        # waits for, so a step's progress and a stop request are never more than a step away from the GPU's work
        previous.synchronize()
        self._events[1:] = previous, written
        return self._bound.outputs


class BatchGraphs:
    """A denoising model whose batch changes within a run as a :class:`CudaGraphRunner` per batch, made by
    ``make(batch)`` when that batch first comes; called like one runner. ``session`` is the first batch's, for what
    reads the model's inputs and outputs. ``weights`` (see :func:`shared_initializers`) live as long as it does."""

    def __init__(self, make: Callable[[int], CudaGraphRunner], first_batch: int, weights: Any = None):
        self._make = make
        self._runners: dict[int, CudaGraphRunner] = {}
        self.weights = weights
        self.session = self.runner(first_batch).session
        self._batch_of = self.session.get_inputs()[0].name  # every input of a denoising model has the same batch

    def runner(self, batch: int) -> CudaGraphRunner:
        if batch not in self._runners:
            self._runners[batch] = self._make(batch)
        return self._runners[batch]

    def __call__(self, feeds: dict[str, Any]) -> list:
        return self.runner(int(np.shape(feeds[self._batch_of])[0]))(feeds)


def shared_initializers(model_file: Path, device: str, min_bytes: int = 1 << 16) -> tuple[list, dict[str, Any]]:
    """The initializers of ``model_file`` of ``min_bytes`` or more as torch tensors on ``device``, and OrtValues
    over them (DLPack: no copy) for ``SessionOptions.add_initializer``: sessions given them use these buffers instead
    of loading weights of their own, when ORT places the initializer on the same device (smaller ones, shapes among
    them, each session reads from the file as usual). Keep the tensors while a session lives."""
    import onnx
    import onnxruntime as ort
    import torch

    from sd_utils.optimize.external_data import ExternalTensors, tensor_array

    # the tool's own reader: onnx's refuses data files with several hard links, which run-time LoRAs' model files are
    model = onnx.load(str(model_file), load_external_data=False)
    external = ExternalTensors(model_file.parent)
    tensors, values = [], {}
    try:
        for initializer in model.graph.initializer:
            array = tensor_array(initializer, external)
            if array.nbytes < min_bytes:
                continue
            with warnings.catch_warnings():  # read-only file bytes: torch copies them to a GPU, and nothing writes them
                warnings.simplefilter("ignore", UserWarning)
                tensor = torch.from_numpy(array).to(device)
            tensors.append(tensor)
            values[initializer.name] = ort.OrtValue.from_dlpack(tensor)
    finally:
        external.close()
    return tensors, values


def take_shared_weights(options, weights: dict[str, Any]) -> None:
    """Make the session of ``options`` (ORT ``SessionOptions``) use ``weights`` (initializers by name, from
    :func:`shared_initializers`) instead of loading its own. The weights it still loads itself stay out of the arena
    the sessions share (``providers.session_options``)."""
    for name, value in weights.items():
        options.add_initializer(name, value)


class DeviceRunner:
    """Runs a plain CUDA session (no CUDA graph: shapes that change within a run, e.g. the batch under
    ``--cfg_cutoff``) on CUDA buffers bound once per set of input shapes, so a step's tensors (DeepCache's feature
    map, a ControlNet's residuals) stay on the device instead of a round trip through the host. Outputs as
    :class:`CudaGraphRunner`'s: the buffers, overwritten by the next call of the same shapes."""

    def __init__(self, session, *, output_shapes: Callable[[dict[str, Any]], list[tuple]], device_id: int = 0):
        self.session = session
        self.output_shapes = output_shapes
        self.device_id = device_id
        self._inputs = [meta.name for meta in session.get_inputs()]  # read once: ORT makes new objects per call
        self._bound: dict[tuple, _Bound] = {}

    def __call__(self, feeds: dict[str, Any]) -> list:
        import torch

        key = tuple(np.shape(feeds[name]) for name in self._inputs)
        if key not in self._bound:
            self._bound[key] = _Bound(self.session, feeds, self.output_shapes, self.device_id)
        bound = self._bound[key]
        bound.load(feeds)
        torch.cuda.current_stream(self.device_id).synchronize()  # the session runs on a stream of ORT's own
        self.session.run_with_iobinding(bound.binding)  # returns once the outputs are written
        return bound.outputs


def unet_output_shapes(latent_channels: int) -> Callable[[dict[str, Any]], list[tuple]]:
    """A UNet's one output: the noise prediction, of the latents' shape (an inpainting UNet's ``sample`` input has
    more channels than that)."""

    def shapes(feeds: dict[str, Any]) -> list[tuple]:
        batch, _, height, width = np.shape(feeds["sample"])
        return [(batch, latent_channels, height, width)]

    return shapes


def _numpy_dtype(dtype) -> Any:
    return np.dtype(str(dtype).removeprefix("torch."))
