"""Peak memory of the VAE decoder, whole image against ``--vae_tiling``, on the CPU provider (no GPU needed):

    python bench/experiments/vae_tiling_memory.py --model_dir models/builtin/random-sdxl-base --size 1024

Builds the decoder with the tool's own Olive workflow for ``--provider cpu`` (fp32; once, into ``--work``), then
decodes one random latent in a fresh process per way, its session's dims pinned as the tool pins them (whole image,
or one tile), and reports the process's peak resident memory (``ru_maxrss``), the resident memory once the session is
loaded, and the decode time. The difference of the two is what the decode's activations took. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_DIR))


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def decode(args) -> dict:
    """One way (``args.way``), in this process."""
    import onnxruntime as ort
    import torch

    from sd_utils.runtime.vae_tiling import decode_tiled, tiled_shape
    from sd_utils.sources.model_spec import ModelSpec, Shape, submodel_io

    spec = ModelSpec.from_folder(args.model_dir)
    shape = Shape(batch=1, height=args.size, width=args.size)
    options = ort.SessionOptions()
    pinned = tiled_shape(spec, shape) if args.way == "tiled" else shape
    for name, value in submodel_io(spec, "vae_decoder").dim_values(pinned).items():
        options.add_free_dimension_override_by_name(name, value)
    session = ort.InferenceSession(str(args.onnx), sess_options=options, providers=["CPUExecutionProvider"])
    latent = args.size // spec.vae_scale_factor
    latents = torch.randn((1, spec.latent_channels, latent, latent), generator=torch.Generator().manual_seed(0))
    loaded = _rss_mib()

    def run(tile):
        return torch.from_numpy(session.run(None, {"latent_sample": tile.numpy()})[0])

    started = time.perf_counter()
    image = decode_tiled(run, latents, spec) if args.way == "tiled" else run(latents)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "rss_loaded_mib": round(loaded),
        "peak_rss_mib": round(peak),
        "decode_mib": round(peak - loaded),
        "seconds": round(seconds, 1),
        "image": list(image.shape),
    }


def build(model_dir: Path, work: Path) -> Path:
    from vae_variant import decoder_workflow  # bench/, this script's folder

    from sd_utils.optimize.olive_workflow import run_submodel
    from sd_utils.runtime.providers import PROVIDERS

    config = decoder_workflow(model_dir, PROVIDERS["cpu"], work)
    return run_submodel(config, submodel="vae_decoder", tempdir=work / "tmp")[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", type=Path, required=True)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--work", type=Path, default=Path("/tmp/vae-tiling-memory"))
    parser.add_argument("--onnx", type=Path, help="an optimized CPU VAE decoder (default: built into --work)")
    parser.add_argument("--way", choices=("whole", "tiled"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.way:
        print("RESULT " + json.dumps(decode(args)), flush=True)
        return 0
    onnx = args.onnx or build(args.model_dir, args.work)
    report = {"size": args.size, "onnx": str(onnx)}
    for way in ("whole", "tiled"):
        command = [sys.executable, __file__, "--model_dir", str(args.model_dir), "--size", str(args.size)]
        child = subprocess.run([*command, "--onnx", str(onnx), "--way", way], capture_output=True, text=True)
        lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
        report[way] = json.loads(lines[-1][7:]) if lines else {"error": child.stderr[-1500:]}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
