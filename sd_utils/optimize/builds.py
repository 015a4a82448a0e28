"""``--list_builds`` and ``--delete_build NAME``: the builds under ``--models_dir`` with what they were made from and
the disk they take, and deleting one (both of its folders) when no run is building it."""

from __future__ import annotations

import dataclasses
import difflib
import shutil
import stat
from pathlib import Path

from sd_utils.errors import UserInputError
from sd_utils.files import exclusive
from sd_utils.optimize.recipe import BUILD_FILE, read_record


@dataclasses.dataclass(frozen=True)
class BuildInfo:
    name: str
    made_from: str  # the model, its provider and LoRAs, from build.json
    size: int  # bytes of both folders (a file linked twice counted once)
    folders: tuple[Path, ...]


def _size(folders) -> int:
    seen, total = set(), 0
    for folder in folders:
        for path in folder.rglob("*"):
            info = path.lstat()
            if stat.S_ISREG(info.st_mode) and (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_size
    return total


def _made_from(record: dict | None) -> str:
    if record is None:
        return "no build.json (unfinished, or made by an older sdxl-olive)"
    source = record.get("source") or {}
    model = f"{source.get('source', record.get('name', '?'))} ({source.get('kind', '?')})"
    loras = ", ".join(f"{lora.get('name')} x{lora.get('scale', 1):g}" for lora in record.get("loras") or [])
    return f"{model} for {record.get('provider', '?')}" + (f" + LoRA {loras}" if loras else "")


def _build_names(models_dir: Path) -> list[str]:
    """The build folders under ``models_dir/optimized`` (hidden staging folders aside), by name."""
    return sorted(folder.name for folder in (models_dir / "optimized").glob("[!.]*") if folder.is_dir())


def _build_info(models_dir: Path, name: str) -> BuildInfo:
    optimized = models_dir / "optimized" / name
    folders = tuple(path for path in (optimized, models_dir / "unoptimized" / name) if path.is_dir())
    return BuildInfo(name, _made_from(read_record(optimized)), _size(folders), folders)


def list_builds(models_dir: Path) -> list[BuildInfo]:
    """Every build under ``models_dir``, by name."""
    return [_build_info(models_dir, name) for name in _build_names(models_dir)]


def delete_build(models_dir: Path, name: str) -> BuildInfo:
    """Delete build ``name`` (its optimized and unoptimized folders), waiting for a run that is building it; one
    line naming the closest names when there is no such build."""
    names = _build_names(models_dir)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        known = ", ".join(close) if close else "see --list_builds"
        raise UserInputError(f"--delete_build {name}: no such build in {models_dir / 'optimized'} ({known})")
    optimized = models_dir / "optimized" / name
    with exclusive(optimized.with_name(f".{name}.lock"), waiting_for=f"building {optimized}"):
        build = _build_info(models_dir, name)
        (optimized / BUILD_FILE).unlink(missing_ok=True)  # first: a half-deleted folder is never taken for a build
        for folder in build.folders:
            shutil.rmtree(folder)
    return build


def human_size(size: int) -> str:
    if size < 1000:
        return f"{size} B"
    for unit in ("KB", "MB", "GB"):
        size /= 1000
        if size < 1000 or unit == "GB":
            break
    return f"{size:.1f} {unit}"
