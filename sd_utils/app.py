"""The use cases the CLI (and the GUI) share: plan a run, get its models ready, generate images.

:func:`plan` resolves and checks everything that can be checked cheaply (models, provider, sizes, base images) before
:func:`prepare_models` spends minutes optimizing, so a wrong option never costs an optimization run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path

from sd_utils.errors import UserInputError
from sd_utils.files import exclusive
from sd_utils.generation.base_images import load_base_images, load_masks
from sd_utils.generation.control_images import load_control_image
from sd_utils.generation.lora_tags import find_lora, prompt_loras
from sd_utils.generation.prompt_syntax import chunk_count
from sd_utils.generation.request import ControlSettings, GeneratedImage, GenerationRequest, RefineSettings
from sd_utils.generation.run import generate_images
from sd_utils.generation.safety import CheckerSource, OnnxSafetyChecker, checker_folder, find_checker, optimize_checker
from sd_utils.generation.schedulers import make_scheduler
from sd_utils.optimize.controlnets import controlled_unet, controlnet_build
from sd_utils.optimize.lora_fusion import fuse_loras
from sd_utils.optimize.olive_workflow import optimize, staged
from sd_utils.optimize.recipe import BuildPaths, BuildRecipe, build_damage, legacy_folder
from sd_utils.optimize.unet_graphs import unet_graph
from sd_utils.options import MAX_SEED, Options, check_image_size
from sd_utils.runtime import deep_cache
from sd_utils.runtime.pipeline import LoadedPipeline, load_pipeline
from sd_utils.runtime.providers import PROVIDERS, Provider, resolve_provider
from sd_utils.sources.controlnet import ControlNetSource, resolve_controlnet
from sd_utils.sources.embeddings import Embeddings, load_embeddings
from sd_utils.sources.lora import LoraFile, inspect_lora, lora_layers
from sd_utils.sources.models import ResolvedModel, composed_with_vae_path, resolve_model, with_unet, with_vae
from sd_utils.sources.single_file import inspect_unet

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Job:
    """A checked run: which models on which provider, and (when generating) exactly what to generate."""

    model: ResolvedModel
    provider: Provider
    request: GenerationRequest | None
    refiner: ResolvedModel | None = None
    checker: CheckerSource | None = None
    embeddings: Embeddings = dataclasses.field(default_factory=Embeddings)  # --embedding, --embedding_dir


@dataclasses.dataclass(frozen=True)
class ReadyModels:
    model: BuildPaths
    refiner: BuildPaths | None = None
    checker: Path | None = None  # the optimized ONNX safety checker folder
    controlnets: dict = dataclasses.field(default_factory=dict)  # ControlNet folder -> its optimized build


def plan(options: Options, *, provider_table: Mapping[str, Provider] = PROVIDERS) -> Job:
    """Resolve models and provider and build the generation request; raises :class:`UserInputError` early.

    ``provider_table``: the rows ``--provider`` picks from (benchmarks and tests hand tuned ones)."""
    check_folders(options)
    model = resolve_model(
        options.model_id, models_dir=options.models_dir, config=options.config, variant=options.variant
    )
    if options.unet:
        model = dataclasses.replace(model, unet_file=inspect_unet(options.unet, model.spec.root / "unet"))
    if options.lora:  # checked now either way: a LoRA that does not fit must not wait for a build
        loras = tuple(inspect_lora(path, scale, components=model.components) for path, scale in options.lora)
        if options.fuse_loras:
            model = dataclasses.replace(model, loras=loras)
    if model.checkpoint is not None or model.loras:
        logger.info("model: %s", model.describe())
    refiner = None
    if options.refiner_model_id:
        refiner = resolve_model(
            options.refiner_model_id,
            models_dir=options.models_dir,
            config=options.refiner_config,
            variant=options.variant,
            option="--refiner_model_id",
        )
        _check_hand_off(model, refiner)
    provider = resolve_provider(
        options.provider, for_inference=options.runs_inference, device_id=options.device_id, table=provider_table
    )
    request = generation_request(options, model) if options.generates and not options.prompts_file else None
    if options.interactive or options.serve:  # requests come later: check sizes now, before optimizing
        generation_request(dataclasses.replace(options, prompt=options.prompt or "check"), model)
    checker = find_checker(
        options.safety_checker,
        model_root=model.spec.root,
        has_component=model.spec.has_safety_checker,
        models_dir=options.models_dir,
    )
    embeddings = load_embeddings(options.embedding, options.embedding_dir, model_root=model.spec.root)
    return Job(model=model, provider=provider, request=request, refiner=refiner, checker=checker, embeddings=embeddings)


def _writable_folder(option: str, folder: Path) -> None:
    """Check that ``folder`` is, or can be made as, a folder this user can write in (without making it: a run that
    stops for another reason leaves nothing behind); raise :class:`UserInputError` if not."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    where = f"{option} {folder}" if existing == folder else f"{option} {folder}: {existing}"
    if not existing.is_dir():
        raise UserInputError(f"{where} is a file, not a folder; give a folder (it is made if missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(f"{where} cannot be written (read-only); give a folder you can write to")


def check_folders(options: Options) -> None:
    """What can only fail later, checked before anything is built: the folders the run writes, a display for the
    window (a wrong option must never cost an optimization run; the CLI checks Ray for ``--ray`` before this)."""
    _writable_folder("--models_dir", options.models_dir)
    if options.cache_dir.exists() and not options.cache_dir.is_dir():
        raise UserInputError(f"--cache_dir {options.cache_dir} is a file, not a folder; give a folder")
    if options.runs_inference:
        _writable_folder("--output_dir", options.output_dir)
    if options.interactive and sys.platform.startswith("linux"):
        if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            raise UserInputError(
                "--interactive needs a display (DISPLAY is not set): run it in a desktop session, or generate with "
                "--prompt on the command line"
            )


def _check_hand_off(base: ResolvedModel, refiner: ResolvedModel) -> None:
    if base.spec.is_refiner:
        raise UserInputError(f"--model_id {base.model_id} is a refiner; with --refiner_model_id give a base model")
    if not refiner.spec.is_refiner:
        raise UserInputError(
            f"--refiner_model_id {refiner.model_id} is not a refiner (it has a text_encoder); "
            "give an SDXL refiner such as stabilityai/stable-diffusion-xl-refiner-1.0 or tiny-refiner"
        )
    if (base.spec.latent_channels, base.spec.vae_scale_factor) != (
        refiner.spec.latent_channels,
        refiner.spec.vae_scale_factor,
    ):
        raise UserInputError(
            f"--refiner_model_id {refiner.model_id} has another latent space than {base.model_id}; "
            "pair a base with its own refiner"
        )


def _check_refine_steps(steps: int, strength: float) -> None:
    """img2img runs ``int(steps * strength)`` denoising steps (diffusers' ``get_timesteps``): at least one is needed."""
    if int(steps * strength) >= 1:
        return
    enough = math.ceil(1 / strength)
    while int(enough * strength) < 1:  # float rounding, e.g. 0.3 x 4 is fine but 1 / 0.3 is 3.33
        enough += 1
    raise UserInputError(
        f"--num_inference_steps {steps} with --strength {strength:g} runs no denoising step ({steps} x {strength:g} "
        f"< 1); use --num_inference_steps {enough} or more, or a higher --strength"
    )


# how much of the schedule is run again when --strength is not given: a refiner's light pass, A1111's img2img default
DEFAULT_STRENGTH = {"refiner": 0.3, "base": 0.75}


def _image_to_image(options: Options, spec) -> RefineSettings:
    """img2img (or inpainting, with masks) from ``--base_images``: a base model's, or a refiner's refinement."""
    size = (options.width, options.height) if options.width and options.height else None
    images = tuple(load_base_images(list(options.base_images), size=size, multiple=spec.size_multiple))
    masks = tuple(load_masks(list(options.mask_image), size=images[0].image.size)) if options.mask_image else ()
    strength = options.strength or DEFAULT_STRENGTH["refiner" if spec.is_refiner else "base"]
    _check_refine_steps(options.num_inference_steps, strength)
    return RefineSettings(
        images=images,
        strength=strength,
        aesthetic_score=options.aesthetic_score,
        negative_aesthetic_score=options.negative_aesthetic_score,
        masks=masks,
    )


def generation_request(options: Options, model: ResolvedModel) -> GenerationRequest:
    """The run ``options`` ask for, checked against the model, with a seed drawn if none was given."""
    spec = model.spec
    refine = None
    if spec.is_inpainting and not options.mask_image:
        raise UserInputError(
            f"--model_id {options.model_id} is an inpainting model (its UNet takes {spec.unet_in_channels} channels): "
            "give the image with --base_images and what to repaint with --mask_image, or use a base model"
        )
    if options.base_images:
        refine = _image_to_image(options, spec)
        width, height = refine.images[0].image.size
    elif spec.is_refiner:
        raise UserInputError(
            f"--model_id {options.model_id} is a refiner: give it images with --base_images A.png [B.png ...], or "
            "generate with a base model and --refiner_model_id"
        )
    else:
        width, height = options.image_size_for(spec.default_image_size)
    check_image_size(width, height, multiple=spec.size_multiple)
    make_scheduler(spec.scheduler_config, options.scheduler, options.timestep_spacing)  # --timestep_spacing fits?
    batch_size = min(options.batch_size, options.num_images)
    if batch_size < options.batch_size:
        logger.info(
            "--batch_size %d is more than --num_images %d: using batches of %d",
            options.batch_size,
            options.num_images,
            batch_size,
        )
    seed = options.seed if options.seed is not None else secrets.randbelow(MAX_SEED - options.num_images)
    loras = runtime_loras(options, model)
    control = control_settings(options, model, size=(width, height))
    if control is not None and refine is not None and refine.masks and options.cfg_cutoff < 1:
        raise UserInputError(  # diffusers' ControlNet inpainting loop drops what its step callback hands back
            "--cfg_cutoff with --controlnet and --mask_image: ControlNet inpainting runs guidance on every step; "
            "leave out --cfg_cutoff (it works for ControlNet text-to-image and img2img)"
        )
    return GenerationRequest(
        prompt=options.prompt or "",
        negative_prompt=options.negative_prompt,
        num_images=options.num_images,
        batch_size=batch_size,
        num_inference_steps=options.num_inference_steps,
        guidance_scale=options.guidance_scale,
        scheduler=options.scheduler,
        timestep_spacing=options.timestep_spacing,
        seed=seed,
        width=width,
        height=height,
        classifier_free_guidance=not options.disable_classifier_free_guidance,
        refine=refine,
        high_noise_frac=options.high_noise_frac if options.refiner_model_id else None,
        loras=loras,
        control=control,
        cfg_cutoff=options.cfg_cutoff,
        cache_interval=options.cache_interval,
    )


def controlnet_sources(options: Options, model: ResolvedModel) -> tuple[ControlNetSource, ...]:
    """The ``--controlnet`` ControlNets, checked against the model (one line each when they do not fit)."""
    if options.controlnet and model.spec.is_refiner:
        raise UserInputError("--controlnet drives a base model's UNet; use it with an SDXL base, not a refiner")
    return tuple(
        resolve_controlnet(given, scale, base=model.spec, models_dir=options.models_dir)
        for given, scale in options.controlnet
    )


def control_settings(options: Options, model: ResolvedModel, *, size: tuple[int, int]) -> ControlSettings | None:
    """The run's ControlNets with their control images (sized to the run, preprocessed); None without any."""
    nets = controlnet_sources(options, model)
    if not nets:
        return None
    thresholds = (options.canny_low, options.canny_high)
    images = tuple(
        load_control_image(
            path, size=size, preprocess=options.control_preprocess, low=thresholds[0], high=thresholds[1]
        )
        for path in options.control_image
    )
    return ControlSettings(nets, images, start=options.control_start, end=options.control_end, canny=thresholds)


def runtime_loras(options: Options, model: ResolvedModel) -> tuple[LoraFile, ...]:
    """The LoRAs a run applies at run time: ``--lora`` (unless ``--fuse_loras`` built them in), then the prompt's
    ``<lora:name:w>`` tags, found in ``--lora_dir``; each checked against the model (one line when it does not
    fit)."""
    given = [] if options.fuse_loras else [(path, scale, "--lora") for path, scale in options.lora]
    for name, weight in prompt_loras(options.prompt or ""):
        given.append((find_lora(name, options.lora_dir), weight, f"<lora:{name}> in the prompt:"))
    loras = tuple(
        inspect_lora(path, scale, components=model.components, option=option) for path, scale, option in given
    )
    for lora in loras:
        lora_layers(model.spec.root, lora)  # every layer placed on the model (read once per file version)
    return loras


def build_recipe(options: Options, model: ResolvedModel, provider: Provider) -> tuple[BuildRecipe, Path | None]:
    """The build ``options`` ask for of ``model`` on ``provider``, and the folder composing it with an fp16-fixed VAE
    (None without ``--use_fp16_fixed_vae``)."""
    if not options.use_fp16_fixed_vae:
        return BuildRecipe.of(model, provider=provider.name), None
    composed = composed_with_vae_path(model, options.use_fp16_fixed_vae, models_dir=options.models_dir)
    vae_root = Path(options.use_fp16_fixed_vae).expanduser()
    return BuildRecipe.of(model, provider=provider.name, vae=options.use_fp16_fixed_vae, vae_root=vae_root), composed


def ensure_optimized(options: Options, model: ResolvedModel, provider: Provider) -> BuildPaths:
    """Optimize when asked to, or when no current build of the model exists yet."""
    recipe, fp16_vae = build_recipe(options, model, provider)
    paths = recipe.paths(options.models_dir)
    if not options.optimize and _usable(recipe, paths, model, options):
        return paths
    with exclusive(
        paths.optimized.with_name(f".{paths.optimized.name}.lock"), waiting_for=f"building {paths.optimized}"
    ):
        if not options.optimize and _usable(recipe, paths, model, options, quiet=True):
            return paths  # another run built it while this one waited
        return _optimize(options, model, provider, recipe=recipe, fp16_vae=fp16_vae)


def _usable(recipe: BuildRecipe, paths: BuildPaths, model: ResolvedModel, options: Options, *, quiet=False) -> bool:
    """Whether the build of ``recipe`` is there, current and complete (else say why it is made, unless ``quiet``)."""
    if recipe.is_current(paths.optimized) and recipe.is_current(paths.unoptimized):
        folder = paths.unoptimized if options.test_unoptimized else paths.optimized
        damage = build_damage(folder, model.spec.submodels)
        if damage is None:
            return True
        if not quiet:
            logger.info("%s is incomplete (%s): optimizing %s again", folder, damage, model.model_id)
        return False
    if not quiet:
        logger.info("optimizing %s first: no current build of %s exists", paths.optimized, model.model_id)
        legacy = legacy_folder(model, options.models_dir)
        if legacy is not None:
            logger.info("%s was made by an older sdxl-olive and is not reused (delete it to free its disk)", legacy)
    return False


def _optimize(
    options: Options, model: ResolvedModel, provider: Provider, *, recipe: BuildRecipe, fp16_vae: Path | None
) -> BuildPaths:
    if fp16_vae is not None:  # copied only when a build needs it, not on every run
        with_vae(model, options.use_fp16_fixed_vae, destination=fp16_vae)
    with contextlib.ExitStack() as stack:  # the new weights live only as long as the build needs them
        roots: dict[str, Path] = {}
        if model.unet_file is not None:
            staging = stack.enter_context(staged(options.models_dir, "unet-"))
            roots["unet"] = with_unet(model.spec.root, model.unet_file.path, staging)
        if model.loras:
            staging = stack.enter_context(staged(options.models_dir, "lora-"))
            fused = fuse_loras(model.spec.root, model.loras, staging, unet_root=roots.get("unet"))
            roots.update({target: fused for lora in model.loras for target in lora.targets})
        return optimize(
            model,
            recipe=recipe,
            provider=provider,
            models_dir=options.models_dir,
            cache_dir=options.cache_dir,
            clean_cache=options.clean_cache,
            tempdir=options.tempdir,
            fp16_vae=fp16_vae,
            component_roots=roots,
        )


def prepare_models(options: Options, job: Job) -> ReadyModels:
    """Optimize the job's model(s) if asked to or needed for generation (with ``--controlnet``, the ControlNets and
    the UNet that takes their residuals too)."""
    model = ensure_optimized(options, job.model, job.provider)
    controlnets = {}
    if options.controlnet and (options.runs_inference or options.optimize):
        controlled_unet(model, job.model, job.provider, cache_dir=options.cache_dir, tempdir=options.tempdir)
        for source in controlnet_sources(options, job.model):
            controlnets[source.root] = controlnet_build(
                source, job.model, job.provider, models_dir=options.models_dir, tempdir=options.tempdir
            )
    if options.cache_interval > 1 and (options.runs_inference or options.optimize):
        cache_graphs(options, job.model, job.provider, model)
    refiner = ensure_optimized(options, job.refiner, job.provider) if job.refiner else None
    checker = None
    if job.checker is not None:
        checker = checker_folder(options.models_dir, job.checker)
        if options.optimize or not (checker / "model.onnx").is_file():
            checker = optimize_checker(
                job.checker,
                provider=job.provider,
                models_dir=options.models_dir,
                cache_dir=options.cache_dir,
                clean_cache=options.clean_cache,
                tempdir=options.tempdir,
            )
    return ReadyModels(model=model, refiner=refiner, checker=checker, controlnets=controlnets)


def open_pipeline(
    options: Options,
    model: ResolvedModel,
    provider: Provider,
    paths: BuildPaths,
    request: GenerationRequest,
    embeddings: Embeddings | None = None,
    *,
    loras: tuple[LoraFile, ...] = (),
    reuse: LoadedPipeline | None = None,
    controlnets: tuple[Path, ...] = (),
    deep_cache: bool = False,
) -> LoadedPipeline:
    folder = paths.unoptimized if options.test_unoptimized else paths.optimized
    if deep_cache:  # built here too: the window and the server may ask for caching after the models were prepared
        cache_graphs(options, model, provider, paths)
    return load_pipeline(
        folder,
        model.spec,
        provider=provider,
        device_id=options.device_id,
        shape=None if options.dynamic_dims else request.shape,
        model_label=model.model_id + (" (unoptimized)" if options.test_unoptimized else ""),
        vae_tiling=options.vae_tiling or options.low_vram,
        low_vram=options.low_vram,
        # a refiner in a hand-off gets the base's latents: optimum's image-to-image pipeline
        task="img2img" if model.spec.is_refiner and request.task == "text2img" else request.task,
        embeddings=embeddings,
        loras=loras,
        reuse=reuse,
        controlnets=controlnets,
        deep_cache=deep_cache,
    )


def cache_graphs(options: Options, model: ResolvedModel, provider: Provider, paths: BuildPaths) -> None:
    """DeepCache's two UNet graphs of the build (made on first use)."""
    for graph in deep_cache.GRAPHS:
        unet_graph(paths, model, provider, graph, flag="--cache_interval", cache_dir=options.cache_dir,
                   tempdir=options.tempdir)  # fmt: skip


class Generator:
    """Generation for one planned job, reusable across runs (the GUI): ORT sessions are created on first use and
    reloaded only when a run needs other static shapes."""

    def __init__(self, options: Options, job: Job, ready: ReadyModels):
        self.options, self.job, self.ready = options, job, ready
        self._loaded: tuple[object, LoadedPipeline, LoadedPipeline | None] | None = None
        self._tokenizer = None  # the model's tokenizer_2, for counting prompt chunks
        self.safety_checker = None
        if ready.checker is not None:
            self.safety_checker = OnnxSafetyChecker(ready.checker, provider=job.provider, device_id=options.device_id)
        else:
            logger.info("no safety checker: images are not checked (--safety_checker ID|DIR adds one)")

    def _text_chunks(self, request: GenerationRequest) -> int:
        """How many 77-token chunks the request's prompts take (A1111's grammar): the UNet's sessions are pinned to
        77 x this many text positions."""
        if self._tokenizer is None:
            from transformers import CLIPTokenizer

            self._tokenizer = CLIPTokenizer.from_pretrained(self.job.model.spec.root / "tokenizer_2")
        negative = request.negative_prompt if request.uses_cfg else None
        return chunk_count(self._tokenizer, request.prompt, negative, words=self.job.embeddings.words)

    def _pipelines(self, request: GenerationRequest) -> tuple[LoadedPipeline, LoadedPipeline | None]:
        """The loaded base (and refiner) for ``request``: made again for other static shapes or another task; for
        other run-time LoRAs only the base's sessions of the parts those change are made again."""
        nets = tuple(self.ready.controlnets[net.root] for net in request.control.nets) if request.control else ()
        cached = request.cache_interval > 1  # DeepCache's two UNet graphs instead of the plain one
        key = (None if self.options.dynamic_dims else request.shape, request.task, nets, cached)
        base = {"loras": request.loras, "controlnets": nets, "deep_cache": cached}
        if self._loaded is not None and self._loaded[0] == key and self._loaded[1].loras != request.loras:
            _, model, refiner = self._loaded
            self._loaded = None
            model = self._open(self.job.model, self.ready.model, request, **base, reuse=model)
            self._loaded = (key, model, refiner)
        if self._loaded is None or self._loaded[0] != key:
            self._loaded = None  # drop the old sessions before creating new ones
            job = self.job
            model = self._open(job.model, self.ready.model, request, **base)
            refiner = self._open(job.refiner, self.ready.refiner, request) if job.refiner is not None else None
            self._loaded = (key, model, refiner)
        return self._loaded[1], self._loaded[2]

    def _open(self, model: ResolvedModel, paths: BuildPaths, request: GenerationRequest, **base):
        """Load ``model``; ``base``: the run-time LoRAs and ControlNets (``loras``, ``controlnets``, ``reuse``), the
        base model's only (a refiner in a hand-off runs as built)."""
        return open_pipeline(self.options, model, self.job.provider, paths, request, self.job.embeddings, **base)

    def generate(
        self, request: GenerationRequest, *, output_dir: Path | None = None, **callbacks
    ) -> list[GeneratedImage]:
        """Run ``request`` into ``output_dir`` (default ``--output_dir``); ``callbacks`` (``on_step``, ``on_image``,
        ``should_stop``, ``saver``) go to :func:`generate_images`."""
        logger.info(
            "generating %d image(s) of %dx%d in %d call(s), seed %d",
            request.num_images,
            request.width,
            request.height,
            request.num_calls,
            request.seed,
        )
        request = dataclasses.replace(request, text_chunks=self._text_chunks(request))
        model, refiner = self._pipelines(request)
        return generate_images(
            model,
            request,
            output_dir=output_dir or self.options.output_dir,
            refiner=refiner,
            safety_checker=self.safety_checker,
            max_safety_retries=self.options.max_safety_retries,
            **callbacks,
        )


def generate(options: Options, job: Job, ready: ReadyModels, **callbacks) -> list[GeneratedImage]:
    """Generate the images of ``job`` (the CLI's one run)."""
    return Generator(options, job, ready).generate(job.request, **callbacks)


def run_once(options: Options, *, provider_table: Mapping[str, Provider] = PROVIDERS) -> list[GeneratedImage]:
    """Plan, get the models ready and generate: what one command line does (the demo tooling calls this)."""
    job = plan(options, provider_table=provider_table)
    return generate(options, job, prepare_models(options, job))
