"""An optimized pipeline folder with another VAE decoder, for the image benchmark, without a second full-size build:

    python bench/experiments/vae_variant.py --precision fp16 --model_dir models/builtin/random-sdxl-base \
        --onnx_dir models/optimized/random-sdxl-base --out /tmp/fp16-vae
    python bench/benchmark.py ... --onnx_dir /tmp/fp16-vae --variants ort_optimized_cudagraph

Runs the tool's own Olive workflow for the VAE decoder alone (``--provider cuda``) from ``--model_dir``'s VAE, then
writes ``--out``: ``--onnx_dir``'s components linked, not copied, and that decoder in place of the tool's (fp16 with
its last up-block an fp32 island). ``--precision fp16``: all fp16, as ``--use_fp16_fixed_vae`` builds it (a
random-weight VAE has the architecture of madebyollin/sdxl-vae-fp16-fix, so its speed is what a user of that option
gets); ``fp32``: all fp32, as the tool built it before the island.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_DIR))


def decoder_workflow(model_dir: Path, provider, work: Path, *, vae_float16: bool = False) -> dict:
    """The tool's Olive workflow config for ``model_dir``'s VAE decoder alone on ``provider``, cache and output in
    ``work``."""
    from sd_utils.optimize.olive_workflow import load_template, unsupported_fusions, workflow_config
    from sd_utils.sources.model_spec import ModelSpec

    return workflow_config(
        load_template("vae_decoder"),
        submodel="vae_decoder",
        provider=provider,
        model_path=model_dir,
        disabled_fusions=unsupported_fusions(
            ModelSpec.from_folder(model_dir), provider=provider, submodel="vae_decoder"
        ),
        vae_float16=vae_float16,
        cache_dir=work / "cache",
        output_dir=work / "out",
    )


def main(argv=None) -> int:
    from sd_utils.optimize.olive_workflow import external_data_files, run_submodel
    from sd_utils.runtime.providers import PROVIDERS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", type=Path, required=True, help="diffusers folder the VAE is exported from")
    parser.add_argument("--onnx_dir", type=Path, required=True, help="optimized pipeline folder (--provider cuda)")
    parser.add_argument("--out", type=Path, required=True, help="new pipeline folder (must not exist)")
    parser.add_argument("--precision", choices=("fp16", "fp32"), required=True, help="of the whole decoder")
    args = parser.parse_args(argv)

    cuda = PROVIDERS["cuda"]
    with tempfile.TemporaryDirectory(prefix="vae-variant-") as temporary:
        work = Path(temporary)
        config = decoder_workflow(args.model_dir, cuda, work, vae_float16=args.precision == "fp16")
        if args.precision == "fp32":
            optimize = config["passes"][cuda.optimize_pass]
            optimize["float16"] = False
            optimize.pop("force_fp32_from")
        _, decoder = run_submodel(config, submodel="vae_decoder", tempdir=work / "tmp")

        args.out.mkdir(parents=True)
        for entry in args.onnx_dir.iterdir():
            if entry.name != "vae_decoder":
                (args.out / entry.name).symlink_to(entry.resolve())
        (args.out / "vae_decoder").mkdir()
        shutil.copy2(args.onnx_dir / "vae_decoder" / "config.json", args.out / "vae_decoder" / "config.json")
        for name in external_data_files(decoder):
            shutil.copy2(decoder.parent / name, args.out / "vae_decoder" / name)
        shutil.copy2(decoder, args.out / "vae_decoder" / "model.onnx")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
