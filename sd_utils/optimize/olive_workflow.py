"""Run one Olive workflow per submodel and gather the results into optimum-loadable pipeline folders.

``config_<submodel>.json`` is pure data holding every provider family's optimize pass; :func:`workflow_config` is
the one pure function that picks the passes for a provider and fills in paths. The results of all submodels are
assembled in a staging folder next to ``models/`` and swapped in only when complete, so a failed or interrupted run
never destroys a model that worked.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from sd_utils.errors import DiskFullError, OptimizationError
from sd_utils.files import disk_full, follow_umask, replace_folder
from sd_utils.optimize.olive_passes import PROJECT_DIR, package_config
from sd_utils.optimize.recipe import BuildPaths, BuildRecipe
from sd_utils.optimize.weight_map import MAP_FILE, MAPPED_SUBMODELS, write_weight_maps
from sd_utils.runtime.providers import Provider
from sd_utils.sources.model_spec import COMPONENT_OF, ModelSpec
from sd_utils.sources.models import ResolvedModel

logger = logging.getLogger(__name__)

CONVERT_PASS = "convert"
PLAIN_COMPONENTS = ("scheduler", "tokenizer", "tokenizer_2", "feature_extractor")


def load_template(submodel: str, *, project_dir: Path = PROJECT_DIR) -> dict[str, Any]:
    path = project_dir / f"config_{submodel}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OptimizationError(f"the Olive workflow {path} is missing; restore it from the repository") from None


def workflow_config(
    template: dict[str, Any],
    *,
    submodel: str,
    provider: Provider,
    model_path: Path,
    cache_dir: Path,
    output_dir: Path,
    disabled_fusions: dict[str, str] | None = None,
    vae_float16: bool = False,
    project_dir: Path = PROJECT_DIR,
) -> dict[str, Any]:
    """The Olive run config of ``submodel`` for ``provider``: a new dict, ``template`` is left untouched.

    Keeps the ``convert`` pass and the provider's optimize pass (and nothing else), targets the provider's
    accelerator, points the input model at ``model_path`` and turns off the fusion options in
    ``disabled_fusions`` (option -> reason, see :func:`unsupported_fusions`). ``vae_float16`` (an fp16-fixed VAE
    is in use) converts the VAE graphs to fp16 on GPU providers, like the other submodels; otherwise the templates
    keep the VAE encoder fp32 and the decoder's last up-block an fp32 island (SDXL's VAE overflows fp16 there).
    """
    config = copy.deepcopy(template)
    passes = config.get("passes", {})
    missing = [name for name in (CONVERT_PASS, provider.optimize_pass) if name not in passes]
    if missing:
        raise OptimizationError(
            f"config_{submodel}.json has no {' or '.join(repr(m) for m in missing)} pass (it has "
            f"{', '.join(passes) or 'none'}); restore the file or add the pass for --provider {provider.name}"
        )
    config["passes"] = {CONVERT_PASS: passes[CONVERT_PASS], provider.optimize_pass: passes[provider.optimize_pass]}
    try:
        system = config["systems"][config["target"]]
    except KeyError:
        raise OptimizationError(f"config_{submodel}.json names no target system under 'systems'") from None
    system["accelerators"] = [{"device": provider.olive_device, "execution_providers": [provider.execution_provider]}]
    optimize = config["passes"][provider.optimize_pass]
    if vae_float16 and provider.fp16 and submodel.startswith("vae"):
        optimize.update(float16=True, keep_io_types=True, force_fp32_ops=["RandomNormalLike"])
        optimize.pop("force_fp32_from", None)  # the fixed VAE does not overflow: no fp32 island
    for option, reason in (disabled_fusions or {}).items():
        logger.info("%s: %s off (%s)", submodel, option, reason)
        optimize.setdefault("optimization_options", {})[option] = False
    # No script_dir: Olive hashes every file under it into the model's cache key (the project folder holds the
    # virtual environment, models/ and outputs/: minutes per submodel, and a new PNG missed the cache). sd_utils is
    # importable in this process already; the export pass's code_digest option keys the cache by the code instead.
    config["input_model"].update(
        model_path=str(model_path),
        model_script=str(project_dir / config["input_model"]["model_script"]),
    )
    config.update(cache_dir=str(cache_dir), output_dir=str(output_dir))
    return config


# ORT's CUDA BiasSplitGelu kernel handles only these widths of the GEGLU projection (8 x the block's channels):
# those of SD 1.x/2.x/XL. onnxruntime/contrib_ops/cuda/diffusion/bias_split_gelu.cc, ORT 1.31.
CUDA_BIAS_SPLIT_GELU_WIDTHS = (2560, 5120, 6144, 10240, 12288)


def unsupported_fusions(spec: ModelSpec, *, provider: Provider, submodel: str) -> dict[str, str]:
    """Fusion options to turn off because the provider's fused kernel cannot run this model's sizes."""
    off = {}
    if provider.name != "cuda":
        return off
    # ORT's CUDA GroupNorm kernel refuses odd channel counts per group at run time ("GroupNorm in CUDA does not
    # support the input: ... c=8 groups=8", seen on the H100 with the tiny VAE)
    odd = [size for size in spec.group_norm_sizes["vae" if submodel.startswith("vae") else "unet"] if size % 2]
    if odd and submodel in ("unet", "vae_encoder", "vae_decoder"):
        reason = f"the CUDA GroupNorm kernel does not support {odd[0]} channel(s) per group"
        off.update(enable_group_norm=reason, enable_skip_group_norm=reason)
    if submodel == "unet":
        widths = sorted({8 * channels for channels in spec.attention_channels} - set(CUDA_BIAS_SPLIT_GELU_WIDTHS))
        if widths:
            off["enable_bias_splitgelu"] = f"the CUDA kernel does not support GEGLU widths {widths}"
    return off


def pass_outputs(footprint_path: Path) -> dict[str, Path]:
    """Map Olive pass type -> the ONNX file it wrote, from a run's ``footprint.json``."""
    if not footprint_path.is_file():
        return {}
    nodes = json.loads(footprint_path.read_text(encoding="utf-8"))
    outputs = {}
    for node in nodes.values():
        config = (node.get("model_config_data") or {}).get("config", {})
        if not (node.get("from_pass") and config.get("model_path")):
            continue
        # Olive records a file for self-contained models and a folder (+ file name) for external-data ones
        path = Path(config["model_path"])
        outputs[node["from_pass"]] = (
            path if path.suffix == ".onnx" else path / (config.get("onnx_file_name") or "model.onnx")
        )
    return outputs


class _WithoutRunHistory(logging.Filter):
    """Olive switches its logger to INFO after every workflow to print the run history (or a hint to install
    tabulate); our own progress lines already say what ran and how long it took."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "run history" not in record.getMessage()


class _DiskFullAside(logging.Filter):
    """Olive logs a pass that failed, traceback and all, on stdout and returns normally: a full disk is kept from
    that log and raised again after the workflow, where the build turns it into one line (exit 7)."""

    def __init__(self):
        super().__init__()
        self.error: OSError | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, OSError) and disk_full(error):
            self.error = error
            return False
        return self.error is None or "No output model produced" not in record.getMessage()


class MissingOliveOutputError(OptimizationError):
    """A workflow ended without one of its models: a pass failed, or the cache named a model that is gone."""


def run_checking_cache(config: dict[str, Any], *, submodel: str, tempdir: Path | None, keep_cache: bool):
    """:func:`run_submodel`, once more from an empty cache when the cache named models that are no longer there (a
    run killed after moving its models out of the cache, ``--clean_cache``, leaves such a cache behind)."""
    cache_dir = Path(config["cache_dir"])
    had_cache = cache_dir.is_dir() and any(cache_dir.iterdir())
    try:
        return run_submodel(copy.deepcopy(config), submodel=submodel, tempdir=tempdir, keep_cache=keep_cache)
    except MissingOliveOutputError:
        if not had_cache:
            raise
    logger.info("the Olive cache %s had lost models of an earlier run (killed mid-way?): rebuilding it", cache_dir)
    shutil.rmtree(cache_dir, ignore_errors=True)
    shutil.rmtree(config["output_dir"], ignore_errors=True)
    return run_submodel(config, submodel=submodel, tempdir=tempdir, keep_cache=keep_cache)


def run_submodel(
    config: dict[str, Any], *, submodel: str, tempdir: Path | None, keep_cache: bool = True
) -> tuple[Path, Path]:
    """Run one workflow; return the ONNX files of the converted and the optimized model (both checked to exist).

    Without ``keep_cache`` the cache's copy of the optimized model is deleted once Olive has copied it to the output
    folder (the cache is then one this run deletes anyway): one copy of the weights less on disk.
    """
    from olive.workflows import run as olive_run

    output_dir = Path(config["output_dir"])  # read first: Olive rearranges the dict it is given
    # Olive's footprint records the pass type, lower-cased, of the pass that produced each model
    pass_types = [step["type"].lower() for step in config["passes"].values()]
    # a handler filter: records of Olive's child loggers reach the "olive" logger's handlers, not its filters
    handlers = logging.getLogger("olive").handlers
    filters = (_WithoutRunHistory(), disk := _DiskFullAside())
    for handler, item in ((handler, item) for handler in handlers for item in filters):
        handler.addFilter(item)
    process_tempdir = tempfile.tempdir  # Olive sets it to ``tempdir`` for the whole process and leaves it there
    try:
        with warnings.catch_warnings():
            # the TorchScript exporter's notes on SDXL's (sound) shape checks and index ops, repeated per module
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
            warnings.filterwarnings("ignore", message=r"Converting a tensor to a Python boolean")
            olive_run(config, tempdir=str(tempdir) if tempdir else None, package_config=package_config())
    finally:
        tempfile.tempdir = process_tempdir
        for handler, item in ((handler, item) for handler in handlers for item in filters):
            handler.removeFilter(item)
    if disk.error is not None:
        raise disk.error
    outputs = pass_outputs(output_dir / "footprint.json")
    found = []
    for pass_type in pass_types:
        onnx_file = outputs.get(pass_type)
        if onnx_file is None or not onnx_file.is_file():
            # Olive logs a failing pass as a warning and returns normally (it also drops passes whose config it
            # finds invalid for the target, e.g. float16 on the CPU provider): a missing output is our error.
            raise MissingOliveOutputError(
                f"Olive produced no {pass_type} model for {submodel} (see the Olive log above); "
                "rerun with --debug, or with --clean_cache if the cache is stale"
            )
        found.append(onnx_file)
    # Olive also copies the last model of the flow into output_dir: hand that copy over (it can be moved), and
    # leave the cache's files alone unless the cache is to go
    final = output_dir / found[1].name
    if not final.is_file():
        return found[0], found[1]
    if not keep_cache:
        for name in external_data_files(found[1]):
            (found[1].parent / name).unlink()
        found[1].unlink()
    return found[0], final


def external_data_files(onnx_file: Path) -> set[str]:
    """Names of the files, beside ``onnx_file``, that hold its external tensor data."""
    import onnx

    graph = onnx.load(str(onnx_file), load_external_data=False).graph
    return {
        entry.value
        for tensor in graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }


def _place(source: Path, destination: Path, *, move: bool) -> None:
    """Move or copy one model file. Never hard-link: onnx refuses external data with several links (it takes them for
    a hard-link attack), which would break the next run that reads the Olive cache (the optimize passes read the
    cached export's tensors through onnx)."""
    if move:
        shutil.move(source, destination)
    else:
        shutil.copy2(source, destination)


def _link_or_copy(source: str, destination: str) -> None:
    """A reused submodel's file as a hard link of the other build's (no second copy of its weights on disk; deleting
    either build leaves the other whole; builds are never changed in place), a copy where links are not possible.
    ONNX Runtime loads linked external data; the onnx package's loader refuses it (see :func:`_place`), and the tool
    never loads a build's weights through it."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _assemble(
    spec: ModelSpec,
    onnx_files: dict[str, Path],
    destination: Path,
    *,
    recipe: BuildRecipe,
    optimized: bool,
    move: bool,
    roots: dict[str, Path],
    reused: dict[str, Path],
) -> None:
    """Write one optimum-loadable pipeline folder from the diffusers folder and one ONNX file per submodel
    (``roots``: the diffusers folder each submodel was exported from, whose component ``config.json`` it gets;
    ``reused``: submodels copied whole from the folder of another build)."""
    destination.mkdir(parents=True)
    index = json.loads((spec.root / "model_index.json").read_text(encoding="utf-8"))
    if "safety_checker" in index:
        # SDXL pipelines have no safety checker: ours is optimized and run separately (sd_utils/safety.py)
        index["safety_checker"] = [None, None]
    (destination / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    for component in PLAIN_COMPONENTS:
        if (spec.root / component).is_dir():
            shutil.copytree(spec.root / component, destination / component)
    for submodel, onnx_file in onnx_files.items():
        target = destination / submodel
        target.mkdir()
        for name in external_data_files(onnx_file):
            _place(onnx_file.parent / name, target / name, move=move)
        _place(onnx_file, target / "model.onnx", move=move)
        shutil.copy2(roots[submodel] / COMPONENT_OF[submodel] / "config.json", target / "config.json")
    for submodel, folder in reused.items():
        shutil.copytree(folder / submodel, destination / submodel, copy_function=_link_or_copy)
    keys = {submodel: recipe.submodel_key(submodel) for submodel in spec.submodels}
    recipe.write_record(destination, optimized=optimized, submodels=keys)  # last: a folder without it is not a build


def reusable_submodels(models_dir: Path, recipe: BuildRecipe, submodels) -> dict[str, BuildPaths]:
    """The submodels another complete build already holds exactly as ``recipe`` would make them (same
    :meth:`BuildRecipe.submodel_key`): another LoRA or scale changes the UNet (and text encoders), not the VAE."""
    from sd_utils.optimize.recipe import build_damage, read_record

    found: dict[str, BuildPaths] = {}
    own = recipe.folder_name
    for record_file in sorted((models_dir / "optimized").glob(f"{recipe.name}-*/build.json")):
        folder = record_file.parent
        other = BuildPaths(optimized=folder, unoptimized=models_dir / "unoptimized" / folder.name)
        records = [read_record(other.optimized), read_record(other.unoptimized)]
        if folder.name == own or any(record is None or record.get("format") != recipe.format for record in records):
            continue
        for submodel in submodels:
            key = recipe.submodel_key(submodel)
            if submodel in found or any((record.get("submodels") or {}).get(submodel) != key for record in records):
                continue
            if all(build_damage(path, [submodel]) is None for path in (other.optimized, other.unoptimized)):
                found[submodel] = other
    return found


STAGING = re.compile(r"^\.optimize-(?:[a-z]+-)?(\d+)-")  # .optimize-[label-]<pid>-<random>


def staging_folder(parent: Path, label: str = "") -> Path:
    """A new hidden staging folder in ``parent``, named after this process. Staging folders of processes that no
    longer run (killed mid-run, so their clean-up never ran: a full-size one holds tens of GB) are deleted first."""
    import psutil

    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.iterdir():
        match = STAGING.match(stale.name)
        if match and stale.is_dir() and not psutil.pid_exists(int(match.group(1))):
            logger.info("deleting %s, left behind by a run that was killed", stale)
            shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".optimize-{label}{os.getpid()}-", dir=parent))
    follow_umask(staging)
    return staging


@contextlib.contextmanager
def staged(parent: Path, label: str = "") -> Iterator[Path]:
    """A :func:`staging_folder` for the ``with`` block, deleted when it ends (what is to stay is moved out first)."""
    staging = staging_folder(parent, label)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def olive_cache(cache_dir: Path, *, clean: bool) -> Iterator[Path]:
    """``cache_dir`` for a run's Olive workflows. With ``clean`` (``--clean_cache``) the run starts from an empty cache
    and leaves none behind, even after a failure: its models may have been moved or deleted out of it (see
    ``optimize``), so no later run may find it."""
    if clean and cache_dir.exists():
        logger.info("deleting the Olive cache %s", cache_dir)
        shutil.rmtree(cache_dir)
    try:
        yield cache_dir
    finally:
        if clean:
            logger.info("deleting the Olive cache %s (--clean_cache)", cache_dir)
            shutil.rmtree(cache_dir, ignore_errors=True)


@contextlib.contextmanager
def _disk_full_is_one_line(models_dir: Path) -> Iterator[None]:
    try:
        yield
    except (OSError, shutil.Error) as error:
        if not disk_full(error):
            raise
        raise DiskFullError(
            f"the disk filled up while optimizing into {models_dir} (the previous build, if any, is untouched); "
            "free some space (a full-size SDXL build needs tens of GB, see README) or use --clean_cache"
        ) from error


def _export_roots(
    model: ResolvedModel, *, fp16_vae: Path | None, component_roots: Mapping[str, Path]
) -> dict[str, Path]:
    """The diffusers folder each submodel is exported from: the fp16-fixed VAE's, a staging folder with new weights
    for its component (``component_roots``: LoRA-fused, ``--unet``), or the model's own."""
    roots = {}
    for submodel in model.spec.submodels:
        component = COMPONENT_OF[submodel]
        if fp16_vae is not None and component == "vae":
            roots[submodel] = fp16_vae
        else:
            roots[submodel] = component_roots.get(component, model.spec.root)
    return roots


def optimize(
    model: ResolvedModel,
    *,
    recipe: BuildRecipe,
    provider: Provider,
    models_dir: Path,
    cache_dir: Path,
    clean_cache: bool = False,
    tempdir: Path | None = None,
    fp16_vae: Path | None = None,
    component_roots: Mapping[str, Path] | None = None,
    project_dir: Path = PROJECT_DIR,
) -> BuildPaths:
    """Convert and optimize every submodel of ``model`` with Olive into the folders of ``recipe`` under ``models_dir``.

    ``clean_cache`` starts from an empty Olive cache and leaves none behind, even when a submodel fails: the models are
    then moved out of it instead of copied, and the cache's copy of each optimized model is deleted as soon as Olive
    has copied it out, which saves two copies of the weights on disk (~28 GB for SDXL base in fp32).

    ``fp16_vae``: a diffusers folder whose ``vae`` is an fp16-fixed VAE (see ``models.with_vae``); the VAE graphs are
    exported from it and, on GPU providers, converted to fp16. ``component_roots``: component -> a staging folder
    holding its new weights (LoRA-fused, see ``lora_fusion``; ``--unet``); those submodels are exported from it.

    Submodels that another build already holds as this one would make them (see :func:`reusable_submodels`) are
    copied from it instead of running their workflow again.
    """
    with olive_cache(cache_dir, clean=clean_cache), staged(models_dir) as staging, _disk_full_is_one_line(models_dir):
        submodels = model.spec.submodels
        component_roots = dict(component_roots or {})
        roots = _export_roots(model, fp16_vae=fp16_vae, component_roots=component_roots)
        reused = reusable_submodels(models_dir, recipe, submodels)
        started = time.perf_counter()
        converted, optimized = {}, {}
        for index, submodel in enumerate(submodels, 1):
            step = f"[{index}/{len(submodels)}] {submodel}"
            if submodel in reused:
                logger.info("%s: reused from %s (made from the same weights)", step, reused[submodel].optimized)
                continue
            logger.info("%s: convert -> %s", step, provider.optimize_pass)
            tick = time.perf_counter()
            # an export from a staging folder is never made again: its cache goes with the staging folder
            private = roots[submodel] in component_roots.values()
            config = workflow_config(
                load_template(submodel, project_dir=project_dir),
                submodel=submodel,
                provider=provider,
                model_path=roots[submodel],
                disabled_fusions=unsupported_fusions(model.spec, provider=provider, submodel=submodel),
                vae_float16=fp16_vae is not None,
                cache_dir=staging / "olive-cache" if private else cache_dir,
                output_dir=staging / "olive" / submodel,
                project_dir=project_dir,
            )
            converted[submodel], optimized[submodel] = run_checking_cache(
                config, submodel=submodel, tempdir=tempdir, keep_cache=not (clean_cache or private)
            )
            logger.info("%s done in %.1f s", step, time.perf_counter() - tick)
        assemble = functools.partial(_assemble, model.spec, recipe=recipe, roots=roots)
        unoptimized_from = {name: paths.unoptimized for name, paths in reused.items()}
        assemble(converted, staging / "unoptimized", optimized=False, move=clean_cache, reused=unoptimized_from)
        optimized_from = {name: paths.optimized for name, paths in reused.items()}
        assemble(optimized, staging / "optimized", optimized=True, move=True, reused=optimized_from)
        for submodel in (name for name in MAPPED_SUBMODELS if name in optimized):  # reused ones come with theirs
            folders = [staging / kind / submodel for kind in ("unoptimized", "optimized")]
            write_weight_maps(
                submodel, roots[submodel], {folder / "model.onnx": folder / MAP_FILE for folder in folders}
            )
        result = recipe.paths(models_dir)
        replace_folder(staging / "unoptimized", result.unoptimized)
        replace_folder(staging / "optimized", result.optimized)
        logger.info(
            "optimized %s for %s in %.1f s -> %s",
            model.model_id,
            provider.name,
            time.perf_counter() - started,
            result.optimized,
        )
        return result
