"""The two graphs a ControlNet run adds to a build, each made by its own Olive workflow with the UNet's passes and fp16
handling (``config_controlnet.json``, ``config_unet_controlnet.json``, see ``unet_graphs.py``), and only when a run
asks for a ControlNet:

* ``<build>/unet_controlnet``: the base model's UNet with the ControlNet residuals as inputs, next to the plain UNet
  (which runs without a ControlNet, as before). One per build: every ControlNet of the architecture shares it.
* ``optimized/controlnets/<name>-<provider>-<key>/controlnet``: one ControlNet, keyed by its weights' SHA-256 and the
  provider (a copy or a move of the same file finds its build).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

from sd_utils.files import exclusive, replace_folder
from sd_utils.optimize.olive_workflow import staged
from sd_utils.optimize.recipe import BuildPaths
from sd_utils.optimize.unet_graphs import run_workflow, unet_graph
from sd_utils.runtime.providers import Provider
from sd_utils.sources.controlnet import ControlNetSource
from sd_utils.sources.models import ResolvedModel, copy_configs

logger = logging.getLogger(__name__)

CONTROLLED_UNET = "unet_controlnet"
FORMAT = 1  # of a ControlNet build: a change here rebuilds them


def controlled_unet(
    paths: BuildPaths, model: ResolvedModel, provider: Provider, *, cache_dir: Path, tempdir: Path | None
) -> Path:
    """The build's UNet that takes ControlNet residuals (made on first use, next to the plain UNet)."""
    return unet_graph(
        paths, model, provider, CONTROLLED_UNET, flag="--controlnet", cache_dir=cache_dir, tempdir=tempdir
    )


def controlnet_folder(source: ControlNetSource, provider: Provider, *, models_dir: Path) -> Path:
    key = hashlib.sha256(f"{source.sha256}|{provider.name}|{FORMAT}".encode()).hexdigest()[:8]
    return models_dir / "optimized" / "controlnets" / f"{source.name}-{provider.name}-{key}"


def controlnet_build(
    source: ControlNetSource,
    model: ResolvedModel,
    provider: Provider,
    *,
    models_dir: Path,
    tempdir: Path | None,
) -> Path:
    """The optimized ControlNet ``source`` for ``provider`` (``<folder>/controlnet/model.onnx``), built on first use."""
    folder = controlnet_folder(source, provider, models_dir=models_dir)
    if (folder / "build.json").is_file():
        return folder
    with exclusive(folder.with_name(f".{folder.name}.lock"), waiting_for=f"building {folder}"):
        if (folder / "build.json").is_file():
            return folder
        started = time.perf_counter()
        logger.info("optimizing ControlNet %s for %s -> %s", source.name, provider.name, folder)
        # its export comes from a staging folder: an Olive cache of its own, which goes with it
        with staged(folder.parent, "controlnet-") as staging:
            root = staging / "source"  # the base model's configs (the IO contract) + the ControlNet
            copy_configs(model.spec.root, root)
            (root / "controlnet").symlink_to(source.root, target_is_directory=True)
            out = staging / "build"
            run_workflow(
                "controlnet", root, provider, spec=model.spec, cache_dir=staging / "olive-cache", tempdir=tempdir,
                work=staging, out=out / "controlnet",
            )  # fmt: skip
            shutil.copy2(source.root / "config.json", out / "controlnet" / "config.json")
            record = {"name": source.name, "source": str(source.root), "sha256": source.sha256, "format": FORMAT}
            record["provider"] = provider.name
            (out / "build.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
            replace_folder(out, folder)
        logger.info("optimized ControlNet %s in %.1f s", source.name, time.perf_counter() - started)
    return folder
