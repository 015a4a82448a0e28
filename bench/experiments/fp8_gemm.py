"""Would fp8 matrix products buy the UNet step its missing milliseconds? One run, one card, GPU time only.

    python bench/experiments/fp8_gemm.py --model_dir models/builtin/random-sdxl-base [--size 1024]

Lists the matrix products of one SDXL UNet step (batch 2: one image with classifier-free guidance) from the model's
own linear layers, run on the meta device, with the packing ONNX Runtime's UNet fusions do (self-attention Q, K and
V in one product, cross-attention K and V in one). Each distinct shape becomes a one-node ONNX graph, timed on the
CUDA EP as:

- ``fp16``: ``MatMul`` with an fp16 weight (what the optimized UNet runs now);
- ``fp8_w8a8``: ONNX Runtime's ``MatMulBlockQuantizedFp8Weight`` with fp8 E4M3 weights (one scale per 128 inputs of
  each output) and a static activation scale, so the activations are quantized to fp8 too (its SM90 path);
- ``fp8_w8a16``: the same op without the activation scale (weight-only: activations stay fp16);
- ``fp8_gemm``: ``QuantizeLinear`` to fp8 + ``GemmFloat8`` (cuBLASLt's fp8 product, per-tensor scales).

GPU time per call is the sum of the CUDA kernels torch's profiler sees (launch overheads excluded, as in a CUDA graph
replay); the report weighs each shape by its calls per step and gives each method's relative error against fp32
(inputs N(0, 1), weights N(0, 1/K)). Needs CUDA, torch with CUDA and onnxruntime-gpu.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_DIR))
sys.path.insert(0, str(PROJECT_DIR / "bench"))  # benchmark.py

METHODS = ("fp16", "fp8_w8a8", "fp8_w8a16", "fp8_gemm")
FP8_MAX = 448.0  # largest finite float8 E4M3FN value
BLOCK = 128
# ONNX Runtime's UNet fusions compute these projections as one product (packed QKV / packed KV)
PACKED = re.compile(r"(.*\.attn1)\.to_[qkv]$|(.*\.attn2)\.to_[kv]$")


def unet_gemms(model_dir: Path, size: int) -> collections.Counter:
    """(M, K, N) -> calls per UNet step (batch 2), from the linear layers of the UNet in the diffusers folder
    ``model_dir`` (its config only: the model is built and run on the meta device)."""
    import torch
    from benchmark import unet_inputs
    from diffusers import UNet2DConditionModel

    from sd_utils.sources.model_spec import ModelSpec

    feeds = unet_inputs(ModelSpec.from_folder(model_dir), size, device="meta", dtype=torch.float32)
    seen: dict[str, tuple[int, int, int]] = {}

    def hook(name):
        def record(module, args, output):
            rows = args[0].numel() // args[0].shape[-1]
            seen[name] = (rows, module.in_features, module.out_features)

        return record

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model_dir / "unet")).eval()
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(hook(name))
    with torch.no_grad():
        unet(
            feeds["sample"],
            feeds["timestep"],
            feeds["encoder_hidden_states"],
            added_cond_kwargs={"text_embeds": feeds["text_embeds"], "time_ids": feeds["time_ids"]},
        )
    products: dict[str, list[int]] = {}
    for name, (rows, k, n) in seen.items():
        match = PACKED.match(name)
        key = (match.group(1) or match.group(2)) if match else name
        if key in products:
            products[key][2] += n
        else:
            products[key] = [rows, k, n]
    return collections.Counter(tuple(shape) for shape in products.values())


def _graph(method: str, m: int, k: int, n: int, weight, activation_amax: float):
    """A one-node ONNX model computing ``A @ weight`` (``weight``: fp32 torch tensor [K, N]) by ``method``."""
    import numpy as np
    import torch
    from onnx import TensorProto, helper

    def initializer(name, tensor: torch.Tensor, onnx_type):
        array = tensor.contiguous().cpu()
        if array.dtype == torch.float8_e4m3fn:  # numpy has no fp8: its bytes as they are
            array = array.view(torch.uint8)
        raw = array.numpy().tobytes()
        return helper.make_tensor(name, onnx_type, list(array.shape), raw, raw=True)

    inputs = [helper.make_tensor_value_info("A", TensorProto.FLOAT16, [m, k])]
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT16, [m, n])]
    ms = "com.microsoft"
    a_scale = activation_amax / FP8_MAX
    if method == "fp16":
        nodes = [helper.make_node("MatMul", ["A", "W"], ["Y"])]
        inits = [initializer("W", weight.half(), TensorProto.FLOAT16)]
    elif method in ("fp8_w8a8", "fp8_w8a16"):
        rows = weight.t().contiguous()  # [N, K]
        blocks = rows.reshape(n, -1, BLOCK) if k % BLOCK == 0 else None
        if blocks is None:
            raise ValueError(f"K={k} is not a multiple of {BLOCK}")
        scale = blocks.abs().amax(dim=2).clamp(min=1e-12) / FP8_MAX  # [N, K/128]
        quantized = (blocks / scale[..., None]).reshape(n, k).to(torch.float8_e4m3fn)
        inits = [
            initializer("B", quantized, TensorProto.FLOAT8E4M3FN),
            initializer("b_scale", scale.float(), TensorProto.FLOAT),
        ]
        names = ["A", "B", "b_scale"]
        if method == "fp8_w8a8":
            inits.append(helper.make_tensor("a_scale", TensorProto.FLOAT, [], [a_scale]))
            names.append("a_scale")
        nodes = [helper.make_node("MatMulBlockQuantizedFp8Weight", names, ["Y"], domain=ms, block_size=BLOCK)]
    elif method == "fp8_gemm":
        b_scale = float(weight.abs().amax()) / FP8_MAX
        quantized = (weight.t() / b_scale).to(torch.float8_e4m3fn)  # [N, K], transB=1
        inits = [
            initializer("B", quantized, TensorProto.FLOAT8E4M3FN),
            helper.make_tensor("a_scale", TensorProto.FLOAT16, [], [np.float16(a_scale)]),
            helper.make_tensor("a_zero", TensorProto.FLOAT8E4M3FN, [], [0.0]),
            helper.make_tensor("scale_a", TensorProto.FLOAT, [], [a_scale]),
            helper.make_tensor("scale_b", TensorProto.FLOAT, [], [b_scale]),
        ]
        nodes = [
            helper.make_node("QuantizeLinear", ["A", "a_scale", "a_zero"], ["A8"]),
            helper.make_node(
                "GemmFloat8",
                ["A8", "B", "", "scale_a", "scale_b"],
                ["Y"],
                domain=ms,
                transB=1,
                dtype=TensorProto.FLOAT16,
            ),
        ]
    else:
        raise ValueError(method)
    graph = helper.make_graph(nodes, method, inputs, outputs, initializer=inits)
    # opset 19: the first with fp8 QuantizeLinear, and one every ONNX Runtime CUDA kernel of these ops covers
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19), helper.make_opsetid(ms, 1)])
    model.ir_version = 9
    return model.SerializeToString()


def time_method(method: str, m: int, k: int, n: int, *, runs: int) -> dict:
    import numpy as np
    import onnxruntime as ort
    import torch
    from benchmark import profile_kernels

    generator = torch.Generator(device="cuda").manual_seed(m * 7 + k * 3 + n)
    a32 = torch.randn((m, k), device="cuda", generator=generator)
    w32 = torch.randn((k, n), device="cuda", generator=generator) / k**0.5
    a16 = a32.half()
    reference = a16.float() @ w32
    session = ort.InferenceSession(
        _graph(method, m, k, n, w32, float(a16.abs().amax())), providers=[("CUDAExecutionProvider", {"device_id": 0})]
    )
    output = torch.empty((m, n), dtype=torch.float16, device="cuda")
    binding = session.io_binding()
    binding.bind_input("A", "cuda", 0, np.float16, (m, k), a16.data_ptr())
    binding.bind_output("Y", "cuda", 0, np.float16, (m, n), output.data_ptr())
    step = lambda: session.run_with_iobinding(binding)  # noqa: E731
    profile = profile_kernels(step, runs=runs, top=4)
    error = float((output.float() - reference).norm() / reference.norm())
    return {"gpu_ms": profile["gpu_ms_per_step"], "rel_error": round(error, 5), "kernels": profile["kernels"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", type=Path, required=True, help="diffusers SDXL folder (its UNet config)")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args(argv)

    import onnxruntime as ort
    import torch

    torch.cuda.init()
    ort.preload_dlls()
    gemms = unet_gemms(args.model_dir, args.size)
    methods = args.methods.split(",")
    shapes, totals = [], dict.fromkeys(methods, 0.0)
    for (m, k, n), calls in sorted(gemms.items(), key=lambda item: -2 * item[0][0] * item[0][1] * item[0][2] * item[1]):
        row = {"m": m, "k": k, "n": n, "calls": calls, "tflop": round(2 * m * k * n * calls / 1e12, 3)}
        for method in methods:
            try:
                row[method] = time_method(method, m, k, n, runs=args.runs)
                totals[method] += row[method]["gpu_ms"] * calls
            except Exception as error:  # noqa: BLE001 - one shape's refusal is a result to report
                row[method] = {"error": str(error).splitlines()[0][:300]}
        shapes.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    report = {
        "settings": {"model_dir": str(args.model_dir), "size": args.size, "unet_batch": 2, "runs": args.runs},
        "tflop_per_step": round(sum(row["tflop"] for row in shapes), 3),
        "gemm_ms_per_step": {method: round(total, 3) for method, total in totals.items()},
        "shapes": shapes,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
