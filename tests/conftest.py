"""Shared fixtures: one tiny SDXL optimized through the real CLI and Olive, reused by every end-to-end test."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")
# no test may reach a model hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclasses.dataclass(frozen=True)
class Workspace:
    models_dir: Path
    cache_dir: Path

    def args(self, *extra: str) -> list[str]:
        """CLI arguments that keep a test's models and Olive cache inside this workspace."""
        return ["--models_dir", str(self.models_dir), "--cache_dir", str(self.cache_dir), *extra]

    def build(self, model_id: str = "tiny", provider: str = "cpu"):
        """The folders (``optimized``, ``unoptimized``) of ``model_id``'s build for ``provider`` in this workspace."""
        from sd_utils.build.recipe import BuildRecipe
        from sd_utils.sources.models import resolve_model

        model = resolve_model(model_id, models_dir=self.models_dir)
        return BuildRecipe.of(model, provider=provider).paths(self.models_dir)

    def tiny(self, options: str, *extra: str) -> list[str]:
        """Arguments for the tiny model on CPU: ``options`` split on spaces, then ``extra`` as given."""
        return self.args("--model_id", "tiny", "--provider", "cpu", *options.split(), *extra)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("workspace")
    return Workspace(models_dir=root / "models", cache_dir=root / "cache")


@pytest.fixture(scope="session")
def tiny_optimized(workspace):
    """``--optimize --model_id tiny --provider cpu`` run once through ``main``; returns the workspace."""
    from stable_diffusion_xl import main

    assert main(workspace.tiny("--optimize")) == 0
    return workspace


@pytest.fixture(scope="session")
def tiny_spec(tiny_optimized):
    from sd_utils.sources.model_spec import ModelSpec

    return ModelSpec.from_folder(tiny_optimized.models_dir / "builtin" / "tiny")


@pytest.fixture(scope="session")
def tiny_refiner_optimized(tiny_optimized):
    """``--optimize --model_id tiny-refiner`` into the same workspace as the tiny base."""
    from stable_diffusion_xl import main

    assert main(tiny_optimized.args("--optimize", "--model_id", "tiny-refiner", "--provider", "cpu")) == 0
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
