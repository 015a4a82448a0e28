"""A job's output folder: its images, named by row key and image index, and ``manifest.jsonl``, one line per image.

The images are the truth: an image is complete when its file exists (files appear whole, see ``save_png_as``). The
manifest says what went into each; a line lost to a kill between the PNG and its line is written on the next run.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any

MANIFEST = "manifest.jsonl"
JOB_LOCK = ".job.lock"  # held by the run writing into the folder
# <row number>-<row key>-<image index>-<seed>.png
_IMAGE = re.compile(r"^(\d+)-([0-9a-f]{12})-(\d+)-(\d+)\.png$")


def image_name(row_number: int, key: str, index: int, seed: int) -> str:
    return f"{row_number:05d}-{key}-{index}-{seed}.png"


class JobFolder:
    """What a job's output folder already holds, and the manifest it appends to (thread-safe, one line per image)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / MANIFEST
        self._lock = threading.Lock()
        # (row key, image index) -> seed, for every complete image; and row key -> {image index: file name}
        self.images: dict[tuple[str, int], int] = {}
        self.files: dict[str, dict[int, str]] = {}
        if folder.is_dir():
            for item in folder.iterdir():
                if match := _IMAGE.match(item.name):
                    key, index = match.group(2), int(match.group(3))
                    self.images[(key, index)] = int(match.group(4))
                    self.files.setdefault(key, {})[index] = item.name
        self.listed: set[str] = set()
        self._checked_tail = False
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    self.listed.add(json.loads(line)["file"])
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a kill: its image is listed again below

    def seed_of(self, key: str) -> int | None:
        """The first seed of a row some of whose images exist (image i has seed + i), to finish it alike."""
        for index in self.files.get(key, {}):
            return self.images[(key, index)] - index
        return None

    def complete(self, key: str, index: int) -> bool:
        return (key, index) in self.images

    def _cut_partial_line(self) -> None:
        """Drop a last line a kill cut short (no newline): the next line would be glued to it, and both lost."""
        if not self.path.is_file():
            return
        with self.path.open("rb+") as manifest:
            data = manifest.read()
            if data and not data.endswith(b"\n"):
                manifest.truncate(data.rfind(b"\n") + 1)

    def record(self, entry: dict[str, Any]) -> None:
        """Append ``entry`` (its ``file`` names the image) to the manifest unless it is listed already."""
        with self._lock:
            if entry["file"] in self.listed:
                return
            if not self._checked_tail:
                self._cut_partial_line()
                self._checked_tail = True
            with self.path.open("a", encoding="utf-8") as manifest:
                manifest.write(json.dumps(entry, ensure_ascii=False) + "\n")
                manifest.flush()
                os.fsync(manifest.fileno())
            self.listed.add(entry["file"])
