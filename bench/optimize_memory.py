"""Peak memory and wall time of ``--optimize`` on full-size SDXL, per submodel and in total.

    python bench/optimize_memory.py [--model_id random-sdxl-base,random-sdxl-refiner] [--provider cpu,dml,cuda]
                                    [--single_file]

Each model is first built (when missing) in its own measured step. Then for each model x provider this runs the
real command line, ``python stable_diffusion_xl.py --optimize --model_id M --provider P --clean_cache``, in one
process, and samples
the resident memory of that process and all its children (psutil, every 0.2 s). The tool's progress lines say which
phase is running (build, each submodel's Olive workflow, assembling the folders), so each sample is charged to a
phase. With ``--single_file`` each model is first written as one fp16 single-file checkpoint (the layout of
A1111/Civitai files, ``sources.original_layout``; a measured preparation step), and the command line is given that
file: its conversion into a diffusers folder is then part of the measured run. Prints one JSON document. Each run
gets a fresh Olive cache (measure the work, not a cache hit) that
``--clean_cache`` gives back at the end; its outputs are deleted too unless ``--keep``: a full-size fp32 run needs
~38 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

PROJECT_DIR = Path(__file__).resolve().parent.parent
# "[2/5] unet: convert -> optimize_cpu" starts a submodel's workflow; "building the ..." the model build
PHASE_PATTERNS = (
    (re.compile(r"\[\d+/\d+\] (\w+): convert"), None),
    (re.compile(r"building the "), "build"),
    (re.compile(r"converting .* into the diffusers folder"), "convert_single_file"),
)
DONE_PATTERN = re.compile(r"\[\d+/\d+\] \w+ done in")
BUILD = """
import logging, sys
from pathlib import Path
from sd_utils.sources.models import resolve_model
logging.basicConfig(level=logging.INFO)
model = resolve_model(sys.argv[1], models_dir=Path(sys.argv[2]))
if len(sys.argv) > 3:  # --single_file: write the model as one fp16 checkpoint
    import torch
    from sd_utils.sources.original_layout import write_single_file
    write_single_file(model.path, Path(sys.argv[3]), dtype=torch.float16)
"""


class PhaseWatch:
    """Follows the tool's log lines (read on a thread) and charges memory samples to the phase they name."""

    def __init__(self):
        self.phase = "start"
        self.rows: dict[str, dict[str, float]] = {}
        self._tick = time.perf_counter()
        self.lines: list[str] = []

    def read(self, stream) -> None:
        for line in stream:
            self.lines.append(line.rstrip())
            for pattern, name in PHASE_PATTERNS:
                match = pattern.search(line)
                if match:
                    self.enter(name or match.group(1))
            if DONE_PATTERN.search(line):
                self.enter("assemble")

    def enter(self, phase: str) -> None:
        now = time.perf_counter()
        self.rows.setdefault(self.phase, {"wall_s": 0.0, "peak_rss_gb": 0.0})["wall_s"] += now - self._tick
        self.phase, self._tick = phase, now

    def sample(self, rss: int) -> None:
        row = self.rows.setdefault(self.phase, {"wall_s": 0.0, "peak_rss_gb": 0.0})
        row["peak_rss_gb"] = max(row["peak_rss_gb"], rss / 2**30)


def measure(command: list[str], *, interval: float = 0.2) -> dict:
    """Run ``command``; return its exit code, wall time, peak RSS (with children) and the same per phase."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=PROJECT_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    watch = PhaseWatch()
    reader = threading.Thread(target=watch.read, args=(process.stdout,), daemon=True)
    reader.start()
    watched = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            family = [watched, *watched.children(recursive=True)]
            rss = sum(member.memory_info().rss for member in family if member.is_running())
        except psutil.Error:
            rss = 0  # a child ended between listing and reading
        peak = max(peak, rss)
        watch.sample(rss)
        time.sleep(interval)
    reader.join()
    watch.enter("end")
    phases = {
        name: {"wall_s": round(row["wall_s"], 1), "peak_rss_gb": round(row["peak_rss_gb"], 2)}
        for name, row in watch.rows.items()
        if name != "start" or row["wall_s"] > 1
    }
    return {
        "exit_code": process.returncode,
        "wall_s": round(time.perf_counter() - started, 1),
        "peak_rss_gb": round(peak / 2**30, 2),
        "phases": phases,
        "log_tail": watch.lines[-3:] if process.returncode else [],
    }


def _made_folders(models_dir: Path) -> set[Path]:
    """The build (and converted-checkpoint) folders in ``models_dir``: what a run adds is deleted after it."""
    return {path for kind in ("optimized", "unoptimized", "converted") for path in models_dir.glob(f"{kind}/*")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_id", default="random-sdxl-base,random-sdxl-refiner", help="comma-separated")
    parser.add_argument("--provider", default="cpu,dml,cuda", help="comma-separated: cpu, dml, cuda")
    parser.add_argument("--models_dir", type=Path, default=PROJECT_DIR / "models")
    parser.add_argument("--keep", action="store_true", help="keep the optimized and unoptimized folders")
    parser.add_argument(
        "--single_file", action="store_true", help="give the tool each model as an fp16 single-file checkpoint"
    )
    args = parser.parse_args(argv)

    report = {
        "machine": {"cpus": psutil.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)},
        "runs": [],
    }
    report["builds"] = {}
    for model_id in args.model_id.split(","):
        # building a built-in model is its own step (the first --optimize of it would do it too)
        build = [sys.executable, "-c", BUILD, model_id, str(args.models_dir)]
        source = model_id
        if args.single_file:
            source = str(args.models_dir / "single" / f"{model_id}.safetensors")
            Path(source).parent.mkdir(parents=True, exist_ok=True)
            build.append(source)
        report["builds"][model_id] = measure(build)
        print(json.dumps({"build": model_id, **report["builds"][model_id]}), file=sys.stderr, flush=True)
        for provider in args.provider.split(","):
            before = _made_folders(args.models_dir)
            with tempfile.TemporaryDirectory(prefix="optimize-memory-", dir=args.models_dir.parent) as scratch:
                command = [
                    sys.executable,
                    "stable_diffusion_xl.py",
                    "--optimize",
                    "--model_id",
                    source,
                    "--provider",
                    provider,
                    "--models_dir",
                    str(args.models_dir),
                    "--cache_dir",
                    str(Path(scratch) / "cache"),
                    "--clean_cache",
                ]
                run = {"model_id": model_id, "provider": provider, "command": command[1:], **measure(command)}
            if not args.keep:
                for folder in _made_folders(args.models_dir) - before:
                    shutil.rmtree(folder, ignore_errors=True)
            report["runs"].append(run)
            print(json.dumps(run), file=sys.stderr, flush=True)
    report["all_succeeded"] = all(run["exit_code"] == 0 for run in report["runs"])
    report["max_peak_rss_gb"] = max(run["peak_rss_gb"] for run in report["runs"])
    print(json.dumps(report, indent=2))
    return 0 if report["all_succeeded"] else 1


if __name__ == "__main__":
    sys.exit(main())
