"""Shared fixtures: one tiny SDXL optimized through the real CLI and Olive, reused by every end-to-end test."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")
os.environ.setdefault("OTEL_SDK_DISABLED", "true")  # see stable_diffusion_xl.py
# no test may reach a model hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # each pytest-xdist worker's torch and ONNX Runtime (and its subprocesses') get their share of the cores: threads
    # of several workers on the same cores spin against each other
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))
    os.environ.setdefault("SDXL_OLIVE_THREADS", str(_share))  # sd_utils.runtime.providers.THREADS_VARIABLE


@dataclasses.dataclass(frozen=True)
class Workspace:
    models_dir: Path
    cache_dir: Path

    def args(self, *extra: str) -> list[str]:
        """CLI arguments that keep a test's models and Olive cache inside this workspace."""
        return ["--models_dir", str(self.models_dir), "--cache_dir", str(self.cache_dir), *extra]

    def build(self, model_id: str = "tiny", provider: str = "cpu"):
        """The folders (``optimized``, ``unoptimized``) of ``model_id``'s build for ``provider`` in this workspace."""
        from sd_utils.optimize.recipe import BuildRecipe
        from sd_utils.sources.models import resolve_model

        model = resolve_model(model_id, models_dir=self.models_dir)
        return BuildRecipe.of(model, provider=provider).paths(self.models_dir)

    def build_names(self) -> list[str]:
        """The build folders in this workspace (not the hidden lock files, nor the folders of changed weights that
        live as long as a session uses them)."""
        return sorted(path.name for path in (self.models_dir / "optimized").iterdir() if not path.name.startswith("."))

    def tiny(self, options: str, *extra: str) -> list[str]:
        """Arguments for the tiny model on CPU: ``options`` split on spaces, then ``extra`` as given."""
        return self.args("--model_id", "tiny", "--provider", "cpu", *options.split(), *extra)


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory) -> Path:
    """A folder all pytest-xdist workers of this run share (each worker's own temp folder is one level below)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(shared_dir: Path, name: str, make: Callable[[Workspace], None]) -> Workspace:
    """The workspace ``make`` fills, made by the first worker of the run that asks for it and reused by the others
    (read-only: tests copy it, see :func:`copy_workspace`)."""
    from sd_utils.files import exclusive

    with exclusive(_lock_file(shared_dir, name), waiting_for=f"building the test models {name!r}"):
        return _made(shared_dir, name, make)


def _lock_file(shared_dir: Path, name: str) -> Path:
    """The lock a worker holds while it makes the workspace ``name`` (``built_once``, ``built_side_by_side``)."""
    return shared_dir / f"{name}.lock"


def _made(shared_dir: Path, name: str, make: Callable[[Workspace], None]) -> Workspace:
    """The workspace ``name`` of this run, made by ``make`` unless it is done (call holding its lock)."""
    seed = Workspace(models_dir=shared_dir / name / "models", cache_dir=shared_dir / name / "cache")
    done = shared_dir / name / "done"
    if not done.exists():
        make(seed)
        done.touch()
    return seed


def built_side_by_side(shared_dir: Path, makes: dict[str, Callable[[Workspace], None]]) -> list[Workspace]:
    """The workspaces of :func:`built_once` for each of ``makes`` (by name); a worker that finds one being made by
    another worker makes the next one meanwhile, instead of waiting for each in turn."""
    from filelock import FileLock, Timeout

    for name, make in makes.items():
        lock = FileLock(_lock_file(shared_dir, name))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue  # another worker is making it
        try:
            _made(shared_dir, name, make)
        finally:
            lock.release()
    return [built_once(shared_dir, name, make) for name, make in makes.items()]


def copy_workspace(source: Workspace, destination: Workspace) -> Workspace:
    """``source``'s models and Olive cache copied into ``destination`` (times kept: builds stay current)."""
    shutil.copytree(source.models_dir, destination.models_dir, symlinks=True, dirs_exist_ok=True)
    shutil.copytree(source.cache_dir, destination.cache_dir, symlinks=True, dirs_exist_ok=True)
    return destination


def _optimize_tiny(work: Workspace) -> None:
    from stable_diffusion_xl import main

    assert main(work.tiny("--optimize")) == 0


def _optimize_tiny_refiner(work: Workspace) -> None:
    from stable_diffusion_xl import main

    assert main(work.args("--optimize", "--model_id", "tiny-refiner", "--provider", "cpu")) == 0


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Workspace:
    """This worker's workspace, empty until a fixture below fills it."""
    root = tmp_path_factory.mktemp("workspace")
    return Workspace(models_dir=root / "models", cache_dir=root / "cache")


@pytest.fixture(scope="session")
def tiny_optimized(workspace, shared_dir):
    """The tiny base and refiner optimized for CPU through the real CLI and Olive, once per test run (the first
    worker builds the base, the second the refiner meanwhile), both copied into this worker's workspace (its Olive
    cache holds both builds' runs); returns the workspace."""
    makes = {"tiny-cpu": _optimize_tiny, "tiny-refiner-cpu": _optimize_tiny_refiner}
    for built in built_side_by_side(shared_dir, makes):
        copy_workspace(built, workspace)
    return workspace


@pytest.fixture(scope="session")
def tiny_spec(tiny_optimized):
    from sd_utils.sources.model_spec import ModelSpec

    return ModelSpec.from_folder(tiny_optimized.models_dir / "builtin" / "tiny")


@pytest.fixture(scope="session")
def tiny_refiner_optimized(tiny_optimized):
    """The workspace of :func:`tiny_optimized`, which has the tiny refiner's build too."""
    return tiny_optimized


@pytest.fixture(scope="session")
def cuda_build(tiny_optimized, tmp_path_factory):
    """``--optimize --model_id tiny --provider cuda`` (for the gpu-marked tests); returns the optimized folder."""
    from stable_diffusion_xl import main

    models = tmp_path_factory.mktemp("cuda") / "models"
    args = ["--optimize", "--model_id", "tiny", "--provider", "cuda", "--models_dir", str(models)]
    assert main([*args, "--cache_dir", str(tiny_optimized.cache_dir)]) == 0
    return Workspace(models_dir=models, cache_dir=tiny_optimized.cache_dir).build(provider="cuda").optimized


@pytest.fixture(scope="session")
def base_image_files(tmp_path_factory):
    """Base images as users have them: RGB, different sizes, grayscale, RGBA with transparency."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("base_images")
    rng = np.random.default_rng(0)
    files = {
        "rgb_96x64.png": Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)),
        "rgb_128x128.png": Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)),
        "gray_96x64.png": Image.fromarray(rng.integers(0, 255, (64, 96), dtype=np.uint8), mode="L"),
        "rgba_96x64.png": Image.fromarray(rng.integers(0, 255, (64, 96, 4), dtype=np.uint8), mode="RGBA"),
    }
    for name, image in files.items():
        image.save(folder / name)
    (folder / "not_an_image.png").write_text("hello")
    return folder
