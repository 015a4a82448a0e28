"""A build without its weights, small enough to travel to the lent GPU machine, and its weights made again there.

A full-size CUDA build takes ~15 minutes of the GPU host's CPUs, most of a 30-minute lease (and the lease may end
before it does). So the build is made on this machine (a CUDA build needs no GPU) and only its graphs travel: every
file of the build's folder as built except the external data files, which the GPU machine writes again, each tensor
at its offset, floating-point ones filled with random values of their dtype, the others (shapes, indices) with their
own bytes, which travel in the manifest. The unoptimized folder travels as its ``build.json`` only (a run reads that
record; it loads the optimized graphs), a built-in model's folder without its weights. For speed figures only: a
random-weight model's speed does not depend on its values, and the values are not the model's.

A build's identity must come out the same there: a built-in model's does; one made with ``--vae DIR`` names the
folder as typed, so make it here with the path it will have there (``/tmp/sdxl/models/taesdxl-random`` for
bench/caching.py's tiny-VAE rows under bench/gpu_run.sh): that folder travels in the pack and is put back at that
path with its files' times (the identity's digest takes weights by size and time).

    python bench/carry_build.py pack MODELS_DIR BUILD_NAME DEST     # here; DEST then travels (device `carry`)
    python bench/carry_build.py unpack DEST MODELS_DIR              # on the GPU machine
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # sd_utils, for the VAE folder's digest

MANIFEST = "carry_manifest.json"
CARRY_LIMIT = 60 * 2**20  # what one device command carries, less a margin for the working tree
KEPT_LIMIT = 2**20  # a non-float external tensor larger than this is not a shape or an index table: refuse it
BLOCK_VALUES = 1 << 22  # random values written over and over (values do not matter, only that they are finite)
# ONNX TensorProto data types -> numpy dtype names of the floating-point ones (filled with random values)
FLOAT_TYPES = {1: "float32", 10: "float16", 11: "float64"}


def _external_tensors(onnx_file: Path) -> dict[str, list[dict]]:
    """data file (relative to the build folder) -> [{offset, length, dtype}] of ``onnx_file``'s external tensors."""
    import onnx

    model = onnx.load(str(onnx_file), load_external_data=False)
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.t.data_location == onnx.TensorProto.EXTERNAL or attribute.g.node:
                raise SystemExit(f"{onnx_file}: node {node.name} holds external data or a subgraph; not supported")
    tensors: dict[str, list[dict]] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = (onnx_file.parent / entries["location"]).as_posix()
        row = {"offset": int(entries.get("offset", 0)), "length": int(entries["length"]), "dtype": tensor.data_type}
        tensors.setdefault(location, []).append(row)
    return tensors


def pack(models_dir: Path, name: str, dest: Path) -> None:
    source = models_dir / "optimized" / name
    tensors: dict[str, list[dict]] = {}
    for onnx_file in sorted(source.rglob("*.onnx")):
        for location, rows in _external_tensors(onnx_file).items():
            tensors.setdefault(Path(location).relative_to(source).as_posix(), []).extend(rows)
    out = dest / "optimized" / name
    shutil.rmtree(dest, ignore_errors=True)
    files = [path for path in sorted(source.rglob("*")) if path.is_file()]
    for path in files:
        relative = path.relative_to(source).as_posix()
        if relative not in tensors:
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, out / relative)
    manifest = {"name": name, "data_files": {}}
    for relative, rows in tensors.items():
        data = source / relative
        with data.open("rb") as handle:
            for row in rows:
                if row["dtype"] not in FLOAT_TYPES:
                    assert row["length"] <= KEPT_LIMIT, f"{relative}: a {row['length']}-byte non-float tensor"
                    handle.seek(row["offset"])
                    row["bytes"] = base64.b64encode(handle.read(row["length"])).decode("ascii")
        manifest["data_files"][relative] = {"size": data.stat().st_size, "tensors": rows}
    record = models_dir / "unoptimized" / name / "build.json"
    (dest / "unoptimized" / name).mkdir(parents=True)
    shutil.copy2(record, dest / "unoptimized" / name / "build.json")
    recorded = json.loads(record.read_text(encoding="utf-8"))
    _pack_builtin(models_dir, recorded["source"], dest)
    manifest["vae"] = _pack_vae(recorded.get("vae"), dest)
    (dest / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    size = sum(path.stat().st_size for path in dest.rglob("*") if path.is_file())
    weights = sum(entry["size"] for entry in manifest["data_files"].values())
    print(json.dumps({"packed": str(dest), "bytes": size, "weights_left_behind": weights}))
    assert size <= CARRY_LIMIT, f"{dest} holds {size} bytes: more than one command carries"


def _pack_builtin(models_dir: Path, source: dict, dest: Path) -> None:
    """A built-in model's folder without its weights (a run on a current build reads its configs and record only):
    the GPU machine need not make it (a minute of a lease)."""
    if source["kind"] != "builtin":
        return
    folder = models_dir / "builtin" / source["source"]
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix not in (".safetensors", ".bin"):
            target = dest / "builtin" / source["source"] / path.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def _pack_vae(identity: str | None, dest: Path) -> dict | None:
    """The ``--vae DIR`` folder a build's identity names (``DIR:digest``), whole, with its files' modification times:
    the digest takes weight files by size and time, and a copy's new times would make another identity there."""
    path, _, digest = identity.rpartition(":") if identity else ("", "", "")
    folder = Path(path)
    if not path or not folder.is_dir():
        return None
    shutil.copytree(folder, dest / "vae")
    files = [file for file in folder.rglob("*") if file.is_file()]
    times = {file.relative_to(folder).as_posix(): file.stat().st_mtime_ns for file in files}
    return {"path": path, "digest": digest, "mtimes_ns": times}


def _unpack_vae(source: Path, entry: dict | None) -> None:
    """The ``--vae DIR`` folder back at the path it had, its files' times as they were (see _pack_vae)."""
    if entry is None:
        return
    from sd_utils.files import folder_digest

    folder = Path(entry["path"])
    shutil.copytree(source / "vae", folder, dirs_exist_ok=True)
    for relative, mtime_ns in entry["mtimes_ns"].items():
        os.utime(folder / relative, ns=(mtime_ns, mtime_ns))
    assert folder_digest(folder) == entry["digest"], f"{folder}: not the VAE the build was made from"


def unpack(source: Path, models_dir: Path) -> None:
    import numpy as np

    started = time.perf_counter()
    manifest = json.loads((source / MANIFEST).read_text(encoding="utf-8"))
    name = manifest["name"]
    for kind in ("optimized", "unoptimized"):
        shutil.copytree(source / kind / name, models_dir / kind / name, dirs_exist_ok=True)
    if (source / "builtin").is_dir():
        shutil.copytree(source / "builtin", models_dir / "builtin", dirs_exist_ok=True)
    block = np.random.default_rng(0).standard_normal(BLOCK_VALUES).astype(np.float32) * 0.02
    blocks = {code: memoryview(block.astype(dtype).tobytes()) for code, dtype in FLOAT_TYPES.items()}
    for relative, entry in manifest["data_files"].items():
        with (models_dir / "optimized" / name / relative).open("wb") as handle:
            handle.truncate(entry["size"])
            for row in entry["tensors"]:
                handle.seek(row["offset"])
                if "bytes" in row:
                    handle.write(base64.b64decode(row["bytes"]))
                    continue
                left, fill = row["length"], blocks[row["dtype"]]
                while left:
                    left -= handle.write(fill[: min(left, len(fill))])
    _unpack_vae(source, manifest.get("vae"))
    written = sum(entry["size"] for entry in manifest["data_files"].values())
    print(json.dumps({"unpacked": name, "bytes": written, "seconds": round(time.perf_counter() - started, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack")
    packing.add_argument("models_dir", type=Path)
    packing.add_argument("name")
    packing.add_argument("dest", type=Path)
    unpacking = commands.add_parser("unpack")
    unpacking.add_argument("source", type=Path)
    unpacking.add_argument("models_dir", type=Path)
    args = parser.parse_args()
    if args.command == "pack":
        pack(args.models_dir, args.name, args.dest)
    else:
        unpack(args.source, args.models_dir)


if __name__ == "__main__":
    main()
