"""The denoising UNet replayed as a CUDA graph (ONNX Runtime's CUDA EP ``enable_cuda_graph``).

ONNX Runtime captures the whole UNet on its first run and replays it afterwards without launching its ~2,000 kernels
one by one. That needs fixed device addresses for every input and output: :class:`CudaGraphUNet` allocates them once,
binds them once, and copies each call's tensors into them (device to device). Shapes must be static, which the
free-dimension overrides of ``load_pipeline`` guarantee, and every node must run on the CUDA EP.
"""

from __future__ import annotations

from typing import Any

# ONNX tensor element types -> torch dtypes, for the session's inputs
TORCH_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}


def cuda_graph_providers(device_id: int) -> list[Any]:
    return [("CUDAExecutionProvider", {"device_id": str(device_id), "enable_cuda_graph": "1"})]


class CudaGraphUNet:
    """Runs a UNet session (created with :func:`cuda_graph_providers`) on fixed, once-bound CUDA buffers.

    ``__call__`` returns the output buffer itself: it is overwritten by the next call, which is what a denoising
    loop needs (the scheduler reads it before the next step).
    """

    def __init__(self, session, *, device_id: int = 0, output_like: str = "sample"):
        self.session = session
        self.device_id = device_id
        self.output_like = output_like  # the UNet's prediction has the shape of its sample input
        self._binding = None
        self._inputs: dict[str, Any] = {}
        self._output = None

    def _bind(self, feeds: dict[str, Any]) -> None:
        import torch

        device = torch.device("cuda", self.device_id)
        binding = self.session.io_binding()
        for meta in self.session.get_inputs():
            dtype = getattr(torch, TORCH_DTYPES[meta.type])
            buffer = torch.empty(tuple(feeds[meta.name].shape), dtype=dtype, device=device)
            self._inputs[meta.name] = buffer
            binding.bind_input(
                meta.name, "cuda", self.device_id, _numpy_dtype(dtype), tuple(buffer.shape), buffer.data_ptr()
            )
        output = self.session.get_outputs()[0]
        dtype = getattr(torch, TORCH_DTYPES[output.type])
        self._output = torch.empty(tuple(feeds[self.output_like].shape), dtype=dtype, device=device)
        binding.bind_output(
            output.name, "cuda", self.device_id, _numpy_dtype(dtype), tuple(self._output.shape), self._output.data_ptr()
        )
        self._binding = binding

    def __call__(self, feeds: dict[str, Any]):
        import torch

        if self._binding is None:
            self._bind(feeds)
        for name, buffer in self._inputs.items():
            value = feeds[name]
            if not isinstance(value, torch.Tensor):
                value = torch.as_tensor(value)
            buffer.copy_(value.reshape(buffer.shape))
        self.session.run_with_iobinding(self._binding)
        return self._output


def _numpy_dtype(dtype) -> Any:
    import numpy as np

    return np.dtype(str(dtype).removeprefix("torch."))


def use_cuda_graph_unet(pipeline, session, *, device_id: int = 0) -> CudaGraphUNet:
    """Make ``pipeline`` (an optimum ORT SDXL pipeline) denoise through ``session`` replayed as a CUDA graph."""
    runner = CudaGraphUNet(session, device_id=device_id)

    def forward(
        sample,
        timestep,
        encoder_hidden_states,
        timestep_cond=None,
        cross_attention_kwargs=None,
        added_cond_kwargs=None,
        return_dict=True,
    ):
        feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states}
        feeds.update(added_cond_kwargs or {})
        out = runner(feeds)
        if not return_dict:
            return (out,)
        from transformers.utils import ModelOutput  # what optimum's ORTUnet returns

        return ModelOutput(sample=out)

    pipeline.unet.forward = forward
    pipeline.unet.session = session  # releases optimum's own UNet session (and its copy of the weights)
    return runner
