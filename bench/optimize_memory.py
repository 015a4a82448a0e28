"""Peak memory and wall time of ``--optimize``, per submodel and in total (issue: optimize SDXL on a 16-GB machine).

    python bench/optimize_memory.py --model_id random-sdxl-base --provider cpu [--submodels unet,vae_decoder]

Each submodel's Olive workflow runs in a fresh process, exactly as ``--optimize`` configures it, while this process
samples the resident memory of that process and all its children (psutil, every 0.2 s). Prints one JSON document;
a workflow that fails or is killed (out of memory) is reported with its exit code, and the others still run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

WORKER = """
import sys
from pathlib import Path
from sd_utils.models import resolve_model
from sd_utils.olive_workflow import load_template, run_submodel, unsupported_fusions, workflow_config
from sd_utils.providers import PROVIDERS
model_id, submodel, provider, models_dir, cache_dir, output_dir = sys.argv[1:]
model = resolve_model(model_id, models_dir=Path(models_dir))
row = PROVIDERS[provider]
config = workflow_config(load_template(submodel), submodel=submodel, provider=row, model_path=model.spec.root,
                         cache_dir=Path(cache_dir), output_dir=Path(output_dir),
                         disabled_fusions=unsupported_fusions(model.spec, provider=row, submodel=submodel))
run_submodel(config, submodel=submodel, tempdir=None)
"""


def peak_rss_of(command: list[str], *, interval: float = 0.2) -> tuple[int, float, int]:
    """Run ``command``; return (exit code, wall seconds, peak resident bytes of it and its children together)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=PROJECT_DIR, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watched = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            family = [watched, *watched.children(recursive=True)]
            peak = max(peak, sum(member.memory_info().rss for member in family if member.is_running()))
        except psutil.Error:
            pass  # a child ended between listing and reading
        time.sleep(interval)
    return process.returncode, time.perf_counter() - started, peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_id", default="random-sdxl-base")
    parser.add_argument("--provider", default="cpu", choices=("cpu", "dml", "cuda"))
    parser.add_argument("--submodels", default=None, help="comma-separated subset (default: all of the model's)")
    parser.add_argument("--models_dir", type=Path, default=PROJECT_DIR / "models")
    parser.add_argument("--cache_dir", type=Path, default=None, help="default: a fresh temporary Olive cache")
    args = parser.parse_args(argv)

    from sd_utils.models import resolve_model

    model = resolve_model(args.model_id, models_dir=args.models_dir)  # builds a built-in model first if needed
    submodels = args.submodels.split(",") if args.submodels else list(model.spec.submodels)
    report = {
        "model_id": args.model_id,
        "provider": args.provider,
        "machine": {"cpus": psutil.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)},
        "submodels": {},
    }
    with tempfile.TemporaryDirectory(prefix="optimize-memory-") as scratch:
        cache_dir = args.cache_dir or Path(scratch) / "cache"  # a fresh cache: measure the work, not a cache hit
        for submodel in submodels:
            command = [
                sys.executable,
                "-c",
                WORKER,
                args.model_id,
                submodel,
                args.provider,
                str(args.models_dir),
                str(cache_dir),
                str(Path(scratch) / "out" / submodel),
            ]
            code, wall, peak = peak_rss_of(command)
            report["submodels"][submodel] = {
                "exit_code": code,
                "wall_s": round(wall, 1),
                "peak_rss_gb": round(peak / 2**30, 2),
            }
            print(json.dumps({submodel: report["submodels"][submodel]}), file=sys.stderr, flush=True)
    rows = report["submodels"].values()
    report["total"] = {
        "wall_s": round(sum(row["wall_s"] for row in rows), 1),
        "peak_rss_gb": max(row["peak_rss_gb"] for row in rows),
        "all_succeeded": all(row["exit_code"] == 0 for row in rows),
    }
    print(json.dumps(report, indent=2))
    return 0 if report["total"]["all_succeeded"] else 1


if __name__ == "__main__":
    sys.exit(main())
