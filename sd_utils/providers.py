"""One table of ONNX Runtime execution providers: what each needs to optimize for and to run on.

``--provider`` picks a row. Olive uses ``optimize_pass`` and ``olive_device``; inference uses the execution provider,
its options and the session-option hook. Every session gets the CPU provider appended as fallback for the odd op.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from .errors import ProviderUnavailableError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    execution_provider: str
    olive_device: str
    optimize_pass: str
    package: str
    fp16: bool
    # DirectML cannot use ORT's memory pattern optimisation and wants sequential execution
    disable_mem_pattern: bool = False
    # optimum binds torch tensors of the session's device; torch has no DirectML device, so only CUDA binds
    io_binding: bool = False
    # the UNet replayed as a CUDA graph where shapes are static (sd_utils/cuda_graph.py)
    cuda_graph: bool = False
    # execution provider options of every session, beside the device
    options: tuple[tuple[str, str], ...] = ()
    # what the provider needs beyond its package, for the error when it is installed but does not start
    needs: str = ""

    def provider_options(self, device_id: int) -> dict[str, Any]:
        return dict(self.options) if self.name == "cpu" else {"device_id": device_id, **dict(self.options)}


PROVIDERS: dict[str, Provider] = {
    row.name: row
    for row in (
        Provider(
            "dml",
            "DmlExecutionProvider",
            "gpu",
            "optimize_dml",
            "onnxruntime-directml",
            fp16=True,
            disable_mem_pattern=True,
            needs="onnxruntime-directml needs Windows 10 1903 or later and a DirectX 12 GPU with a current driver",
        ),
        Provider(
            "cuda",
            "CUDAExecutionProvider",
            "gpu",
            "optimize_cuda",
            "onnxruntime-gpu",
            fp16=True,
            io_binding=True,
            cuda_graph=True,
            # cuDNN adds a convolution's bias in the convolution's own kernel instead of a second pass over its
            # output (51 such passes per SDXL UNet step, ~1.1 ms on an H100: bench/NOTES.md)
            options=(("fuse_conv_bias", "1"),),
            needs=(
                "onnxruntime-gpu needs an NVIDIA driver and the CUDA and cuDNN libraries of its build "
                "(https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html; a CUDA build of torch "
                "installed beside it provides them)"
            ),
        ),
        Provider("cpu", "CPUExecutionProvider", "cpu", "optimize_cpu", "onnxruntime", fp16=False),
    )
}
PROVIDER_CHOICES = (*PROVIDERS, "auto")


def available_execution_providers() -> list[str]:
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        # onnxruntime-gpu finds the CUDA libraries that ship with torch only after this call
        try:
            ort.preload_dlls()
        except Exception:
            logger.debug("onnxruntime.preload_dlls() failed", exc_info=True)
    return list(ort.get_available_providers())


def resolve_provider(name: str, *, for_inference: bool = True) -> Provider:
    """The row for ``name``; ``auto`` picks DirectML, then CUDA, then CPU, whichever is installed.

    With ``for_inference`` the provider must be usable by this ONNX Runtime; optimizing for a GPU provider does not
    need it (a DirectML build can be made on any machine).
    """
    available = available_execution_providers()
    if name == "auto":
        for row in PROVIDERS.values():
            if row.execution_provider in available:
                return row
    row = PROVIDERS.get(name)
    if row is None:
        raise ProviderUnavailableError(f"unknown provider {name!r}; use one of {', '.join(PROVIDER_CHOICES)}")
    if for_inference and row.execution_provider not in available:
        raise ProviderUnavailableError(
            f"--provider {name} needs {row.execution_provider}, which this onnxruntime does not have "
            f"(it has {', '.join(available)}); install it with 'pip install {row.package}' "
            "(one onnxruntime package per environment) or pick another --provider"
        )
    return row


def check_session_provider(session, provider: Provider, what: str) -> None:
    """Refuse a session that does not run on ``provider``. ONNX Runtime lists an installed GPU provider as available
    even when its libraries cannot load (no cuDNN, a CUDA version it was not built for, no DirectX 12), and then
    creates the session on the CPU with a log line at most: the run would be many times slower, and the fp16 GPU
    graph may not run on the CPU at all."""
    started = session.get_providers()[0]
    if started != provider.execution_provider:
        raise ProviderUnavailableError(
            f"--provider {provider.name}: ONNX Runtime could not start {provider.execution_provider} for {what} and "
            f"fell back to {started}; {provider.needs} (ONNX Runtime's log above names what failed to load), or "
            "use --provider cpu with a model optimized for it"
        )


def session_providers(provider: Provider, device_id: int) -> tuple[list[str], list[dict[str, Any]]]:
    """(providers, provider_options) for ``InferenceSession``, with the CPU provider appended as fallback."""
    providers = [provider.execution_provider]
    options = [provider.provider_options(device_id)]
    if provider.name != "cpu":
        providers.append("CPUExecutionProvider")
        options.append({})
    return providers, options


def session_options(provider: Provider, free_dimensions: dict[str, int] | None = None):
    """ORT ``SessionOptions`` for ``provider``; ``free_dimensions`` pins symbolic dims by name (static shapes)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if provider.disable_mem_pattern:
        options.enable_mem_pattern = False
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    for dim_name, value in (free_dimensions or {}).items():
        options.add_free_dimension_override_by_name(dim_name, value)
    return options
