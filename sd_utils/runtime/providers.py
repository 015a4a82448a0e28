"""One table of ONNX Runtime execution providers: what each needs to optimize for and to run on.

``--provider`` picks a row. Olive uses ``optimize_pass`` and ``olive_device``; inference uses the execution provider,
its options and the session-option hook. Every session gets the CPU provider appended as fallback for the odd op.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

from sd_utils.errors import OutOfMemoryError, ProviderUnavailableError, SdxlOliveError

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
    # execution provider options of the denoising sessions whose batch changes within a run (--cfg_cutoff)
    free_batch_options: tuple[tuple[str, str], ...] = ()
    # ONNX Runtime session config entries of every session (``SessionOptions.add_session_config_entry``)
    session_entries: tuple[tuple[str, str], ...] = ()
    # the sessions of a process take their intermediate tensors from one arena per device (see share_arena)
    shared_arena: bool = False
    # what the provider needs beyond its package, for the error when it is installed but does not start
    needs: str = ""
    # what a 1024² image needs of the device's memory, for the error when memory runs out
    memory_needed: str = ""

    @property
    def memory(self) -> str:
        """The memory the provider's sessions allocate from, as the out-of-memory error names it."""
        return "GPU memory" if self.olive_device == "gpu" else "memory"

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
            options=(
                # cuDNN adds a convolution's bias in the convolution's own kernel instead of a second pass over its
                # output (51 such passes per SDXL UNet step, ~1.1 ms on an H100: bench/NOTES.md)
                ("fuse_conv_bias", "1"),
                # ONNX Runtime's arena grows by what is asked, not by doubling regions: with doubling, a 1024² image
                # did not fit 15 GiB of free GPU memory (a 16-GB card); this way it fits, using 14.4 GiB
                # (bench/memory_fit.py, bench/NOTES.md)
                ("arena_extend_strategy", "kSameAsRequested"),
            ),
            # a UNet whose batch changes within a run (--cfg_cutoff): cuDNN's fused conv+bias plans and its
            # exhaustive search were made again at every batch change, ~2 s each for the full-size UNet on an H100
            # (a 20-step 1024² image under --cfg_cutoff 0.6: 5.4 s with them, 0.97 s without; bench/NOTES.md)
            free_batch_options=(("cudnn_conv_algo_search", "HEURISTIC"), ("fuse_conv_bias", "0")),
            shared_arena=True,
            needs=(
                "onnxruntime-gpu needs an NVIDIA driver and the CUDA and cuDNN libraries of its build "
                "(https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html; a CUDA build of torch "
                "installed beside it provides them)"
            ),
            # measured on an H100 with the rest of its memory held (bench/memory_fit.py, bench/NOTES.md runs 11-13)
            memory_needed=(
                "one 1024x1024 SDXL image takes about 14.2 GiB of free GPU memory with --provider cuda, "
                "10.5 GiB with --vae_tiling, 8.9 GiB with --low_vram"
            ),
        ),
        Provider("cpu", "CPUExecutionProvider", "cpu", "optimize_cpu", "onnxruntime", fp16=False),
    )
}
PROVIDER_CHOICES = (*PROVIDERS, "auto")


def available_execution_providers() -> list[str]:
    import onnxruntime as ort

    # errors only from ONNX Runtime's own logger: its warnings (in colour) would print beside the tool's one line
    ort.set_default_logger_severity(3)
    if hasattr(ort, "preload_dlls"):
        # onnxruntime-gpu finds the CUDA libraries that ship with torch only after this call
        try:
            ort.preload_dlls()
        except Exception:
            logger.debug("onnxruntime.preload_dlls() failed", exc_info=True)
    return list(ort.get_available_providers())


def resolve_provider(
    name: str, *, for_inference: bool = True, device_id: int = 0, table: Mapping[str, Provider] = PROVIDERS
) -> Provider:
    """The row of ``table`` for ``name``; ``auto`` picks DirectML, then CUDA, then CPU, the first that is installed and
    starts. Benchmarks and tests hand a ``table`` of tuned rows (e.g. more provider options) instead of changing
    :data:`PROVIDERS`.

    With ``for_inference`` the provider must be usable by this ONNX Runtime, and is started once on a one-node model
    before anything is optimized for it; optimizing for a GPU provider does not need it (a DirectML build can be made
    on any machine).
    """
    available = available_execution_providers()
    if name == "auto":
        for row in table.values():
            if row.execution_provider not in available:
                continue
            problem = start_problem(row, device_id) if for_inference else None
            if problem is None:
                return row
            logger.warning("--provider auto: %s is installed but does not start (%s)", row.execution_provider, problem)
    row = table.get(name)
    if row is None:
        raise ProviderUnavailableError(f"unknown provider {name!r}; use one of {', '.join(PROVIDER_CHOICES)}")
    if for_inference and row.execution_provider not in available:
        raise ProviderUnavailableError(
            f"--provider {name} needs {row.execution_provider}, which this onnxruntime does not have "
            f"(it has {', '.join(available)}); install it with 'pip install {row.package}' "
            "(one onnxruntime package per environment) or pick another --provider"
        )
    problem = start_problem(row, device_id) if for_inference else None
    if problem is not None:
        raise _not_started(row, problem)
    return row


def probe_model() -> bytes:
    """A one-node model (Identity) to start a provider with, as serialized ONNX."""
    from onnx import TensorProto, helper

    value = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1]) for name in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", value[:1], value[1:])
    # an IR version every supported onnxruntime reads (a newer onnx package writes one older runtimes refuse)
    return helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def start_problem(provider: Provider, device_id: int = 0) -> str | None:
    """Why ``provider`` does not start here, or None when it does (a session on a one-node model). ONNX Runtime lists
    an installed GPU provider as available even when its libraries cannot load (no cuDNN, a CUDA version its build
    does not use, no DirectX 12), and then makes its sessions on the CPU with a log line at most."""
    if provider.name == "cpu":
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ORT's own note that it is not in the list: the answer below says it
            session = new_session(probe_model(), provider, device_id)
    except Exception as error:  # noqa: BLE001 - any failure to start is the answer, e.g. a device id not present
        return str(error).strip().splitlines()[0]
    started = _fell_back_to(session, provider)
    return None if started is None else f"a session fell back to {started}"


def _fell_back_to(session, provider: Provider) -> str | None:
    """The provider ``session`` runs on instead of ``provider``, or None when it runs on ``provider``."""
    started = session.get_providers()[0]
    return None if started == provider.execution_provider else started


# how ONNX Runtime (BFC arena; CUDA, cuBLAS and cuDNN calls, whose statuses it words as "<LIB> failure <n>: <what>";
# a CUDA graph capture that an allocation broke; DirectML's HRESULT) and torch say that an allocation failed
_OUT_OF_MEMORY = re.compile(
    r"requested bytes of (?P<asked>\d+)|requested buffer of size (?P<size>\d+)"
    r"|(?:CUBLAS|CUDNN|CUDA) failure \d+: [^;\n]*(?:allocation failed|out of memory|ALLOC_FAILED)[^;\n]*"
    r"|(?P<capture>CUDA failure 901): [^;\n]*during capture"
    r"|CUDA out of memory[^\n]*|\w*ALLOC_FAILED|8007000E[^\n]*|E_OUTOFMEMORY|out of memory|bad_alloc",
    re.IGNORECASE,
)


def out_of_memory(error: BaseException | str) -> str | None:
    """What could not be allocated, when ``error`` (an exception or its text) says that memory ran out; else None."""
    found = _OUT_OF_MEMORY.search(str(error))
    if found is None:
        return None
    size = found.group("asked") or found.group("size")
    if size:
        return f"ONNX Runtime could not allocate {int(size) / 2**20:,.0f} MiB more"
    if found.group("capture"):
        # CUDA's "capture invalidated": some call inside the capture failed. For a UNet that captures with more free
        # memory, that call is an allocation (bench/NOTES.md, run 12: 10 GiB free, --vae_tiling; the same run
        # without the CUDA graph ran out of memory outright)
        return f"capturing the UNet's CUDA graph failed ({found.group('capture')})"
    return " ".join(found.group(0).split())[:200]


def out_of_memory_error(provider: Provider, doing: str, shortfall: str, fix: str) -> OutOfMemoryError:
    """The one-line error for memory that ran out while ``doing``; ``fix`` (may be empty) says how to need less."""
    needed = f" ({provider.memory_needed})" if provider.memory_needed else ""
    fix = f"{fix}, or " if fix else ""
    return OutOfMemoryError(
        f"--provider {provider.name} ran out of {provider.memory} {doing}: {shortfall}; {fix}close other programs to "
        f"free {provider.memory}{needed}"
    )


@contextlib.contextmanager
def memory_errors(provider: Provider, doing: str, fix: str) -> Iterator[None]:
    """Turn an allocation failure inside the block into :func:`out_of_memory_error`'s one line (ONNX Runtime's own
    is a multi-line status dump that names an internal file, not what to do)."""
    try:
        yield
    except SdxlOliveError:
        raise
    except Exception as error:
        shortfall = out_of_memory(error)
        if shortfall is None:
            raise
        raise out_of_memory_error(provider, doing, shortfall, fix) from error


def _not_started(provider: Provider, problem: str) -> ProviderUnavailableError | OutOfMemoryError:
    shortfall = out_of_memory(problem)
    if shortfall is not None:  # e.g. cuBLAS cannot allocate its handle's workspace: the GPU is full
        return out_of_memory_error(provider, f"starting {provider.execution_provider}", shortfall, "use --provider cpu")
    return ProviderUnavailableError(
        f"--provider {provider.name}: ONNX Runtime could not start {provider.execution_provider} ({problem}); "
        f"{provider.needs} (ONNX Runtime's log above names what failed to load), or use --provider cpu"
    )


def check_session_provider(session, provider: Provider, what: str) -> None:
    """Refuse a session that does not run on ``provider`` (see :func:`start_problem`): the run would be many times
    slower, and a GPU build's fp16 graph may not run on the CPU at all."""
    started = _fell_back_to(session, provider)
    if started is not None:
        raise _not_started(provider, f"the session of {what} fell back to {started}")


def session_providers(provider: Provider, device_id: int) -> tuple[list[str], list[dict[str, Any]]]:
    """(providers, provider_options) for ``InferenceSession``, with the CPU provider appended as fallback."""
    providers = [provider.execution_provider]
    options = [provider.provider_options(device_id)]
    if provider.name != "cpu":
        providers.append("CPUExecutionProvider")
        options.append({})
    return providers, options


def new_session(
    model: str | bytes,
    provider: Provider,
    device_id: int = 0,
    free_dimensions: dict[str, int] | None = None,
    *,
    options=None,
    extra_options: dict[str, str] | None = None,
):
    """An ORT ``InferenceSession`` of ``model`` (a path or serialized ONNX) on ``provider``, CPU fallback included;
    ``free_dimensions`` pins symbolic dims as :func:`session_options` does (or ``options``: session options made
    by it, with more set); ``extra_options``: more options of ``provider``."""
    import onnxruntime as ort

    providers, provider_options = session_providers(provider, device_id)
    provider_options[0].update(extra_options or {})
    return ort.InferenceSession(
        model,
        sess_options=options if options is not None else session_options(provider, free_dimensions),
        providers=providers,
        provider_options=provider_options,
    )


# ONNX Runtime's arena growth strategies, in the order of their numbers (OrtArenaCfg's arena_extend_strategy)
ARENA_EXTEND_STRATEGIES = ("kNextPowerOfTwo", "kSameAsRequested")
# devices whose shared arena this process has registered with ONNX Runtime (share_arena)
_SHARED_ARENAS: set[int] = set()


def share_arena(provider: Provider, device_id: int = 0) -> None:
    """Give the sessions of this process one arena on ``device_id`` for their intermediate tensors, when the provider
    wants it (``Provider.shared_arena``); call it before making the sessions, after the provider is known to start.

    By default every ONNX Runtime session has an arena of its own, which keeps the most memory the session ever
    needed: the UNet's activations would stay reserved while the VAE decoder, last to run, reserves its own. In one
    arena (ONNX Runtime's env allocator, see :func:`session_options`) each stage reuses what the one before freed.
    Stages never overlap and no output ONNX Runtime allocates outlives its run (optimum binds torch buffers), so
    sharing is safe, the CUDA-graph UNet included. What it saves is in bench/NOTES.md (runs 11-12). A CUDA graph
    still writes the arena memory it was captured with, though, so a session made after a capture (a batch's UNet
    under --cfg_cutoff, a UNet with other LoRAs beside a ControlNet's graph) must keep its weights out of the arena:
    :func:`session_options` does so for every session (bench/NOTES.md, session 23)."""
    if not provider.shared_arena or device_id in _SHARED_ARENAS:
        return
    import onnxruntime as ort

    memory = ort.OrtMemoryInfo("Cuda", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, device_id, ort.OrtMemType.DEFAULT)
    # grown as the provider's options grow each session's own arena (the arena config takes the strategy's number)
    strategy = dict(provider.options).get("arena_extend_strategy", "kNextPowerOfTwo")
    arena = ort.OrtArenaCfg({"arena_extend_strategy": ARENA_EXTEND_STRATEGIES.index(strategy)})
    try:
        ort.create_and_register_allocator_v2(provider.execution_provider, memory, {"device_id": str(device_id)}, arena)
    except (AttributeError, RuntimeError) as error:  # an onnxruntime without it, or whose build refuses it
        logger.warning("ONNX Runtime sessions keep an arena each, which needs more GPU memory (%s)", error)
        return
    _SHARED_ARENAS.add(device_id)


# CPU threads of each ONNX Runtime session (default: ORT's, one per physical core); set for Ray's CPU replicas
THREADS_VARIABLE = "SDXL_OLIVE_THREADS"


def session_options(provider: Provider, free_dimensions: dict[str, int] | None = None):
    """ORT ``SessionOptions`` for ``provider``; ``free_dimensions`` pins symbolic dims by name (static shapes)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if provider.shared_arena:  # the arena of share_arena, once registered; until then each session's own
        options.add_session_config_entry("session.use_env_allocators", "1")
        # weights outside it: a CUDA graph captured earlier still writes the arena memory it was captured with
        options.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
    if provider.disable_mem_pattern:
        options.enable_mem_pattern = False
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    for key, value in provider.session_entries:
        options.add_session_config_entry(key, value)
    for dim_name, value in (free_dimensions or {}).items():
        options.add_free_dimension_override_by_name(dim_name, value)
    threads = os.environ.get(THREADS_VARIABLE, "")
    if threads.isdigit() and int(threads) > 0:  # processes sharing a machine's cores (Ray replicas and actors)
        options.intra_op_num_threads = int(threads)
    return options
