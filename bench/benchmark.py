"""GPU benchmark: diffusers PyTorch fp16 vs the ONNX Runtime pipelines on the same SDXL weights, in one run.

    python bench/benchmark.py --model_dir models/builtin/random-sdxl-base \
        --onnx_dir models/optimized/random-sdxl-base --unoptimized_dir models/unoptimized/random-sdxl-base

Each variant runs in its own process (clean GPU memory, fair peak figures) while this process samples the GPU's
memory with nvidia-smi. Prints one JSON document: per-submodel latency, UNet step latency (batch 2 = one image with
classifier-free guidance), end-to-end image latency (see ``image_times``), and peak GPU memory per variant. Needs
CUDA, torch with CUDA and onnxruntime-gpu; times are medians in milliseconds.

A variant name may end in ``@key=value+key=value``: extra settings for the UNet session, e.g.
``ort_optimized_iobinding@sdpa_kernel=8`` (attention by cuDNN's flash kernel). A plain key is a CUDA provider option,
a dotted key (``ep.cuda.enable_gemm_auto_tune``) a session config entry, and ``env.NAME`` an environment variable of
the variant's process (it applies to every session of the variant). Provider options and session entries need
``--unet_only``, which measures the UNet step alone; ``--profile`` adds the UNet step's GPU time by CUDA kernel
(torch's profiler) to every variant without CUDA graph, a host-side profile of one image call to every variant, and
the GPU's busy and idle time (``gpu_timeline``) of the UNet step alone and of the denoising loop.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

VARIANTS = (
    "torch_fp16",
    "torch_compile",  # torch.compile(mode="max-autotune") of the UNet, fused QKV, channels-last (diffusers' recipe)
    "ort_unoptimized",
    "ort_optimized",
    "ort_optimized_iobinding",
    "ort_optimized_cudagraph",  # the tool's --provider cuda: + the UNet as a CUDA graph (sd_utils/cuda_graph.py)
)


def _medians_ms(functions: dict, *, warmup: int, runs: int, synchronize) -> dict:
    """Median wall time (ms) of each function. The functions take turns run by run, so a drift of the machine
    (clocks, a busy host) touches them alike, not whichever happens to be timed first."""
    for function in functions.values():
        for _ in range(warmup):
            function()
    synchronize()
    times = {name: [] for name in functions}
    for _ in range(runs):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            synchronize()
            times[name].append((time.perf_counter() - started) * 1000)
    return {name: round(statistics.median(values), 2) for name, values in times.items()}


def _median_ms(function, *, warmup: int, runs: int, synchronize) -> float:
    return _medians_ms({"": function}, warmup=warmup, runs=runs, synchronize=synchronize)[""]


def unet_inputs(spec, size: int, *, device, dtype):
    import torch

    from sd_utils.sources.model_spec import Shape, submodel_io

    contract = submodel_io(spec, "unet")
    tensors = contract.dummy_inputs(Shape(batch=1, height=size, width=size))
    return {
        name: tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else torch.int64)
        for name, tensor in zip(contract.input_names, tensors, strict=True)
    }


def image_times(pipe, args, *, synchronize) -> dict:
    """End-to-end image latency to PIL images as the tool makes them (``output_type="pt"``, then
    ``generation.to_pil_images``: 8-bit rounding on the GPU), as diffusers' own ``output_type="pil"`` makes them
    (rounding in numpy on the host: ``image_ms`` of runs 1-6), and the same call stopped before the VAE
    (``"latent"``): the difference is the decode and the post-processing, the rest the prompt encoding and the
    denoising loop. The same call with a third of the steps splits the latter by :func:`loop_split`."""
    from sd_utils.generation.output import to_pil_images

    call = dict(num_inference_steps=args.steps, height=args.size, width=args.size, guidance_scale=5.0)
    short = max(1, args.steps // 3)
    ways = {
        "image_ms": lambda: to_pil_images(pipe("a photo", output_type="pt", **call).images),
        "image_diffusers_pil_ms": functools.partial(pipe, "a photo", output_type="pil", **call),
        "denoise_ms": functools.partial(pipe, "a photo", output_type="latent", **call),
        f"denoise_{short}_steps_ms": functools.partial(
            pipe, "a photo", output_type="latent", **{**call, "num_inference_steps": short}
        ),
    }
    times = _medians_ms(ways, warmup=1, runs=args.image_runs, synchronize=synchronize)
    times.update(loop_split(times["denoise_ms"], args.steps, times[f"denoise_{short}_steps_ms"], short))
    if args.profile:
        times["image_host_profile"] = host_profile(ways["image_ms"], synchronize=synchronize)
        times["denoise_timeline"] = gpu_timeline(ways["denoise_ms"], synchronize=synchronize)
    return times


def loop_split(long_ms: float, long_steps: int, short_ms: float, short_steps: int) -> dict:
    """A denoising call's time split into a cost per step (the slope between two step counts) and a cost per call
    (prompt encoding, latents, timesteps: the intercept), so that a one-off cost is not read as the loop's."""
    if long_steps == short_steps:
        return {}
    step = (long_ms - short_ms) / (long_steps - short_steps)
    return {"loop_step_ms": round(step, 3), "loop_fixed_ms": round(long_ms - long_steps * step, 2)}


def host_profile(function, *, synchronize, top: int = 15) -> list[dict]:
    """Where the host's time goes in one call (cProfile, by own time): Python work and the waits inside native calls
    (a session run, a device copy) that a GPU kernel profile does not show."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    function()
    synchronize()
    profiler.disable()
    # pstats' raw table: (file, line, function) -> (primitive calls, calls, own time, cumulative time, callers)
    rows = sorted(pstats.Stats(profiler).stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return [
        {"function": f"{Path(file).name}:{line}({name})", "calls": calls, "own_ms": round(own * 1000, 2)}
        for (file, line, name), (_, calls, own, _, _) in rows
    ]


def gpu_timeline(function, *, synchronize, calls: int = 1, top: int = 8) -> dict:
    """The GPU's busy and idle time over ``calls`` calls of ``function`` (torch's CUPTI profiler sees ONNX Runtime's
    kernels, CUDA-graph replays' included): a loop whose GPU idles between steps shows it as gaps between kernels,
    listed longest first with the kernels on either side. Per call, to compare the UNet step alone with the loop."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    function()
    synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            function()
        synchronize()
    spans = sorted(
        (event.time_range.start, event.time_range.end, event.name)
        for event in prof.events()
        if event.device_type == DeviceType.CUDA
    )
    if not spans:
        return {"error": "the profiler saw no CUDA activity"}
    busy, gaps = 0.0, []
    start, end, name = spans[0]
    for next_start, next_end, next_name in spans[1:]:
        if next_start > end:
            busy += end - start
            gaps.append((next_start - end, name, next_name))
            start = next_start
        if next_end >= end:
            end, name = next_end, next_name
    busy += end - start
    span = spans[-1][1] - spans[0][0]
    long_gaps = [gap for gap in gaps if gap[0] >= 100]
    gaps.sort(key=lambda gap: -gap[0])
    return {
        "activities": len(spans),
        "span_ms_per_call": round(span / 1000 / calls, 3),
        "busy_ms_per_call": round(busy / 1000 / calls, 3),
        "idle_ms_per_call": round((span - busy) / 1000 / calls, 3),
        "gaps_over_100us": len(long_gaps),
        "gaps_over_100us_ms": round(sum(gap[0] for gap in long_gaps) / 1000, 3),
        "gaps_over_100us_median_us": round(statistics.median(gap[0] for gap in long_gaps), 1) if long_gaps else 0,
        "longest_gaps": [
            {"us": round(length, 1), "after": before[:80], "before": after[:80]} for length, before, after in gaps[:top]
        ],
    }


def run_torch(args, *, compiled: bool = False) -> dict:
    """diffusers' PyTorch pipeline in fp16; ``compiled``: its UNet through ``torch.compile(mode="max-autotune")``
    with fused QKV projections and channels-last memory, as diffusers' own speed-up guide does it (the compile time,
    i.e. the first step's, is reported apart)."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from sd_utils.sources.model_spec import ModelSpec

    spec = ModelSpec.from_folder(Path(args.model_dir))
    pipe = StableDiffusionXLPipeline.from_pretrained(args.model_dir, torch_dtype=torch.float16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    sync = torch.cuda.synchronize
    results = {}
    if compiled:
        pipe.fuse_qkv_projections()
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.unet = torch.compile(pipe.unet, mode="max-autotune", fullgraph=True)
    with torch.inference_mode():
        inputs = unet_inputs(spec, args.size, device="cuda", dtype=torch.float16)
        added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
        step = lambda: pipe.unet(  # noqa: E731
            inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], added_cond_kwargs=added
        )
        if compiled:
            started = time.perf_counter()
            step()
            sync()
            results["compile_s"] = round(time.perf_counter() - started, 1)
        results["unet_step_ms"] = _median_ms(step, warmup=3, runs=args.unet_runs, synchronize=sync)
        if args.profile:
            results["unet_profile"] = profile_kernels(step, runs=5)
        if args.unet_only:
            return results
        ids = torch.zeros((1, spec.text_length), dtype=torch.int64, device="cuda")
        results["text_encoder_ms"] = _median_ms(
            lambda: pipe.text_encoder(ids, output_hidden_states=True), warmup=3, runs=10, synchronize=sync
        )
        results["text_encoder_2_ms"] = _median_ms(
            lambda: pipe.text_encoder_2(ids, output_hidden_states=True), warmup=3, runs=10, synchronize=sync
        )
        latent = args.size // spec.vae_scale_factor
        latents = torch.randn((1, spec.latent_channels, latent, latent), device="cuda", dtype=torch.float32)
        pipe.vae.to(torch.float32)  # SDXL's VAE config says force_upcast: diffusers decodes in fp32
        results["vae_decoder_ms"] = _median_ms(lambda: pipe.vae.decode(latents), warmup=2, runs=5, synchronize=sync)
        pipe.vae.to(torch.float16)
    results.update(image_times(pipe, args, synchronize=sync))
    results["torch_max_memory_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return results


def _parse_variant(variant: str) -> tuple[str, dict[str, str]]:
    """``name@key=value+key=value`` -> (name, UNet settings by key; see the module's docstring)."""
    name, _, extra = variant.partition("@")
    settings = dict(item.split("=", 1) for item in extra.split("+") if item)
    return name, settings


def _apply_env(settings: dict[str, str]) -> dict[str, str]:
    """Export the ``env.NAME`` settings (before onnxruntime loads); return the others."""
    for key, value in settings.items():
        if key.startswith("env."):
            os.environ[key.removeprefix("env.")] = value
    return {key: value for key, value in settings.items() if not key.startswith("env.")}


def profile_kernels(step, *, runs: int, top: int = 30) -> dict:
    """GPU time per UNet step by CUDA kernel (torch's CUPTI profiler sees ONNX Runtime's kernels too: ORT's own
    profiler times kernel launches on the host, not the GPU)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            step()
        torch.cuda.synchronize()
    kernels = [
        (event.key, event.device_time_total / 1000 / runs, event.count // runs)
        for event in prof.key_averages()
        if event.device_time_total > 0
    ]
    kernels.sort(key=lambda item: -item[1])
    total = sum(ms for _, ms, _ in kernels)
    return {
        "gpu_ms_per_step": round(total, 2),
        "kernels": [
            {"name": name[:120], "ms": round(ms, 3), "calls": calls, "share": round(ms / total, 3)}
            for name, ms, calls in kernels[:top]
        ],
    }


def run_ort(
    args,
    *,
    folder: str,
    io_binding: bool,
    cuda_graph: bool = False,
    unet_options: dict[str, str] | None = None,
) -> dict:
    import numpy as np
    import onnxruntime as ort
    import torch

    from sd_utils.runtime.cuda_graph import CudaGraphRunner, cuda_graph_session, unet_output_shapes
    from sd_utils.runtime.pipeline import load_pipeline
    from sd_utils.runtime.providers import PROVIDERS, session_options
    from sd_utils.sources.model_spec import ModelSpec, Shape, free_dimension_overrides

    ort.preload_dlls()
    spec = ModelSpec.from_folder(Path(args.model_dir))
    cuda = PROVIDERS["cuda"]
    shape = Shape(batch=1, height=args.size, width=args.size)
    options = session_options(cuda, free_dimension_overrides(spec, shape))
    sync = torch.cuda.synchronize  # the whole device: ORT's streams and ours
    results = {}

    def session(name, *, extra=None, sess_options=options):
        path = str(Path(folder) / name / "model.onnx")
        providers = [("CUDAExecutionProvider", {**cuda.provider_options(0), **(extra or {})})]
        return ort.InferenceSession(path, sess_options=sess_options, providers=providers)

    def bound(sess, feeds: dict):
        """Time ``sess`` on ``feeds`` (torch CUDA tensors): IO binding, or numpy in/out through ``run``."""
        if not io_binding:
            host = {name: tensor.cpu().numpy() for name, tensor in feeds.items()}
            return lambda: sess.run(None, host)
        binding = sess.io_binding()
        for meta in sess.get_inputs():
            tensor = feeds[meta.name].contiguous()
            feeds[meta.name] = tensor
            binding.bind_input(
                meta.name, "cuda", 0, np.dtype(str(tensor.dtype).split(".")[1]), tuple(tensor.shape), tensor.data_ptr()
            )
        for meta in sess.get_outputs():
            binding.bind_output(meta.name, "cuda")
        return lambda: sess.run_with_iobinding(binding)

    def typed(sess, feeds):
        kinds = {meta.name: meta.type for meta in sess.get_inputs()}
        return {
            name: tensor.half() if kinds[name] == "tensor(float16)" else tensor
            for name, tensor in feeds.items()
            if name in kinds
        }

    unet_options = unet_options or {}
    # a dotted key is a session config entry, any other a provider option (see the module's docstring)
    entries = {key: value for key, value in unet_options.items() if "." in key}
    provider_extra = {key: value for key, value in unet_options.items() if "." not in key}
    unet_session_options = options
    if entries:
        unet_session_options = session_options(cuda, free_dimension_overrides(spec, shape))
        for key, value in entries.items():
            unet_session_options.add_session_config_entry(key, value)
    if cuda_graph:
        runner = CudaGraphRunner(
            *cuda_graph_session(
                Path(folder) / "unet" / "model.onnx",
                device_id=0,
                sess_options=unet_session_options,
                extra_options={**dict(cuda.options), **provider_extra},
            ),
            output_shapes=unet_output_shapes(spec.latent_channels),
        )
        unet = runner.session
    else:
        unet = session("unet", extra=provider_extra, sess_options=unet_session_options)
    feeds = typed(unet, unet_inputs(spec, args.size, device="cuda", dtype=torch.float32))
    step = (lambda: runner(feeds)) if cuda_graph else bound(unet, feeds)
    results["unet_step_ms"] = _median_ms(step, warmup=3, runs=args.unet_runs, synchronize=sync)
    if args.profile and not cuda_graph:
        results["unet_profile"] = profile_kernels(step, runs=5)
    if args.profile:
        results["unet_timeline"] = gpu_timeline(step, synchronize=sync, calls=5)
    del unet, step
    if args.unet_only:
        return results
    if unet_options:
        raise SystemExit("UNet session settings apply to the UNet step only: add --unet_only")
    for name in ("text_encoder", "text_encoder_2"):
        encoder = session(name)
        ids = {"input_ids": torch.zeros((1, spec.text_length), dtype=torch.int64, device="cuda")}
        results[f"{name}_ms"] = _median_ms(bound(encoder, ids), warmup=3, runs=10, synchronize=sync)
        del encoder
    decoder = session("vae_decoder")
    latent = args.size // spec.vae_scale_factor
    latents = {"latent_sample": torch.randn((1, spec.latent_channels, latent, latent), device="cuda")}
    results["vae_decoder_ms"] = _median_ms(bound(decoder, typed(decoder, latents)), warmup=2, runs=5, synchronize=sync)
    del decoder

    if cuda_graph:
        del runner  # the pipeline makes its own
    loaded = load_pipeline(
        Path(folder),
        spec,
        provider=cuda,
        shape=shape,
        model_label="bench",
        use_io_binding=io_binding,
        cuda_graph=cuda_graph,
    )
    if cuda_graph:
        assert loaded.unet_graph is not None, "the pipeline's UNet did not load as a CUDA graph"
    pipe = loaded.pipeline
    pipe.set_progress_bar_config(disable=True)
    results.update(image_times(pipe, args, synchronize=sync))
    return results


class GpuMemorySampler(threading.Thread):
    """Largest ``memory.used`` nvidia-smi reports while a variant runs (MiB), minus what was used before."""

    def __init__(self, device: int = 0):
        super().__init__(daemon=True)
        self.device, self.peak, self.stop = device, 0, threading.Event()
        self.baseline = self._read()

    def _read(self) -> int:
        output = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", str(self.device)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return int(output.strip())

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self._read())
            time.sleep(0.05)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, help="diffusers folder (the PyTorch weights)")
    parser.add_argument("--onnx_dir", help="optimized ONNX pipeline folder (--provider cuda; ORT variants)")
    parser.add_argument("--unoptimized_dir", help="unoptimized ONNX pipeline folder (ort_unoptimized)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--unet_runs", type=int, default=20)
    parser.add_argument("--image_runs", type=int, default=5)
    parser.add_argument("--unet_only", action="store_true", help="measure the UNet step alone")
    parser.add_argument(
        "--profile", action="store_true", help="add the UNet step's GPU time by CUDA kernel and a host-side profile"
    )
    parser.add_argument("--run_variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.run_variant:  # child process: measure one variant, print its JSON
        variant, settings = _parse_variant(args.run_variant)
        unet_options = _apply_env(settings)
        folder = args.unoptimized_dir if variant == "ort_unoptimized" else args.onnx_dir
        if variant.startswith("torch_"):
            result = run_torch(args, compiled=variant == "torch_compile")
        else:
            result = run_ort(
                args,
                folder=folder,
                io_binding="iobinding" in variant or "cudagraph" in variant,
                cuda_graph="cudagraph" in variant,
                unet_options=unet_options,
            )
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    report = {
        "settings": {"size": args.size, "steps": args.steps, "unet_batch": 2, "unet_runs": args.unet_runs},
        "variants": {},
    }
    for variant in args.variants.split(","):
        sampler = GpuMemorySampler()
        sampler.start()
        started = time.perf_counter()
        child = subprocess.run(
            [sys.executable, __file__, *(argv or sys.argv[1:]), "--run_variant", variant],
            capture_output=True,
            text=True,
        )
        sampler.stop.set()
        sampler.join()
        lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
        if child.returncode or not lines:
            report["variants"][variant] = {"error": (child.stderr or child.stdout)[-2000:]}
        else:
            report["variants"][variant] = json.loads(lines[-1][len("RESULT ") :])
            report["variants"][variant]["peak_gpu_memory_mb"] = sampler.peak - sampler.baseline
        report["variants"][variant]["wall_s"] = round(time.perf_counter() - started, 1)
        print(json.dumps({variant: report["variants"][variant]}), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
