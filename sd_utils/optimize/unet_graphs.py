"""The extra UNet graphs some runs add to a build, next to the plain UNet, each made on first use by its own Olive
workflow with the UNet's passes and fp16 handling (``config_<name>.json``):

* ``unet_controlnet`` (``--controlnet``): the UNet with a ControlNet's residuals as inputs;
* ``unet_refresh`` and ``unet_shallow`` (``--cache_interval``): DeepCache's full step, which also outputs the feature
  it caches, and its shallow step on that feature (``runtime/deep_cache.py``).

They are exported from the model folder itself, so a build whose UNet weights came from elsewhere (a ``--unet`` file,
fused LoRAs) cannot have them: one line says so. Run-time LoRAs reach them through their weight maps.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from sd_utils.errors import UserInputError
from sd_utils.files import exclusive
from sd_utils.optimize.olive_workflow import (
    _place,
    external_data_files,
    load_template,
    olive_cache,
    run_checking_cache,
    staged,
    unsupported_fusions,
    workflow_config,
)
from sd_utils.optimize.recipe import BuildPaths
from sd_utils.optimize.weight_map import MAP_FILE, write_weight_maps
from sd_utils.runtime.providers import Provider
from sd_utils.sources.models import ResolvedModel

logger = logging.getLogger(__name__)


def run_workflow(submodel: str, root: Path, provider: Provider, *, spec, cache_dir, tempdir, work: Path, out: Path):
    """One Olive workflow (``config_<submodel>.json``) exporting ``submodel`` from the diffusers folder ``root``, its
    outputs in ``work``; the optimized model placed in ``out`` (model.onnx and its data)."""
    config = workflow_config(
        load_template(submodel),
        submodel=submodel,
        provider=provider,
        model_path=root,
        disabled_fusions=unsupported_fusions(spec, provider=provider, submodel="unet"),  # the UNet's blocks
        cache_dir=cache_dir,
        output_dir=work / f"olive-{submodel}",
    )
    _, optimized = run_checking_cache(config, submodel=submodel, tempdir=tempdir, keep_cache=True)
    out.mkdir(parents=True)
    for name in external_data_files(optimized):
        _place(optimized.parent / name, out / name, move=True)
    _place(optimized, out / "model.onnx", move=True)


def unet_graph(
    paths: BuildPaths,
    model: ResolvedModel,
    provider: Provider,
    submodel: str,
    *,
    flag: str,
    cache_dir: Path,
    tempdir: Path | None,
) -> Path:
    """The build's UNet graph ``submodel`` (made on first use, next to the plain UNet); ``flag``: the option that
    asks for it, named in the refusal for builds it cannot come from."""
    target = paths.optimized / submodel
    if (target / "model.onnx").is_file():
        return target
    if model.unet_file is not None or model.loras:
        raise UserInputError(
            f"{flag} runs on builds of a plain model: this one has a --unet file or fused LoRAs (--fuse_loras); "
            "apply LoRAs at run time (without --fuse_loras) or leave --unet out"
        )
    with exclusive(paths.optimized.with_name(f".{paths.optimized.name}.lock"), waiting_for=f"building {target}"):
        if (target / "model.onnx").is_file():
            return target
        started = time.perf_counter()
        logger.info("building %s for %s -> %s", submodel, flag, target)
        with olive_cache(cache_dir, clean=False), staged(paths.optimized.parent, f"{submodel}-") as staging:
            out = staging / submodel
            root = model.spec.root
            run_workflow(
                submodel, root, provider, spec=model.spec, cache_dir=cache_dir, tempdir=tempdir, work=staging, out=out
            )
            shutil.copy2(root / "unet" / "config.json", out / "config.json")
            write_weight_maps("unet", root, {out / "model.onnx": out / MAP_FILE})  # run-time LoRAs reach it too
            out.rename(target)
        logger.info("built %s in %.1f s", target, time.perf_counter() - started)
    return target
