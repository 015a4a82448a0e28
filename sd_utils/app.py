"""The use cases the CLI (and the GUI) share: get a model ready for a provider, and generate images with it."""

from __future__ import annotations

import logging
import secrets

from .errors import UserInputError
from .generation import GeneratedImage, GenerationRequest, LoadedPipeline, load_pipeline, text_to_image
from .models import ResolvedModel, resolve_model
from .olive_workflow import OptimizedModel, optimize, read_marker
from .options import MAX_SEED, Options, check_image_size
from .providers import Provider, resolve_provider

logger = logging.getLogger(__name__)


def optimized_paths(options: Options, model: ResolvedModel) -> OptimizedModel:
    return OptimizedModel(
        optimized=options.models_dir / "optimized" / model.output_name,
        unoptimized=options.models_dir / "unoptimized" / model.output_name,
    )


def ensure_optimized(options: Options, model: ResolvedModel, provider: Provider) -> OptimizedModel:
    """Optimize when asked to, or when no optimized model for ``provider`` exists yet."""
    paths = optimized_paths(options, model)
    marker = read_marker(paths.optimized)
    if options.optimize or marker is None or not (paths.unoptimized / "model_index.json").is_file():
        if not options.optimize:
            logger.info("no optimized model at %s: optimizing first", paths.optimized)
        return optimize(
            model,
            provider=provider,
            models_dir=options.models_dir,
            cache_dir=options.cache_dir,
            clean_cache=options.clean_cache,
            tempdir=options.tempdir,
        )
    built_for = marker.get("provider")
    if built_for != provider.name and not options.test_unoptimized:
        raise UserInputError(
            f"{paths.optimized} was optimized for --provider {built_for}, not {provider.name}; "
            f"rerun with --optimize --provider {provider.name} to rebuild it, or use --provider {built_for}"
        )
    return paths


def generation_request(options: Options, model: ResolvedModel) -> GenerationRequest:
    """The run ``options`` ask for, checked against the model (sizes) and with a seed drawn if none was given."""
    width, height = options.image_size_for(model.spec.default_image_size)
    check_image_size(width, height, multiple=model.spec.size_multiple)
    batch_size = min(options.batch_size, options.num_images)
    if batch_size < options.batch_size:
        logger.info(
            "--batch_size %d is more than --num_images %d: using batches of %d",
            options.batch_size,
            options.num_images,
            batch_size,
        )
    seed = options.seed if options.seed is not None else secrets.randbelow(MAX_SEED - options.num_images)
    return GenerationRequest(
        prompt=options.prompt or "",
        negative_prompt=options.negative_prompt,
        num_images=options.num_images,
        batch_size=batch_size,
        num_inference_steps=options.num_inference_steps,
        guidance_scale=options.guidance_scale,
        seed=seed,
        width=width,
        height=height,
        classifier_free_guidance=not options.disable_classifier_free_guidance,
    )


def prepare(options: Options) -> tuple[ResolvedModel, Provider, OptimizedModel | None]:
    """Resolve the model and provider; optimize if asked or needed for generation."""
    model = resolve_model(options.model_id, models_dir=options.models_dir)
    provider = resolve_provider(options.provider, for_inference=options.generates)
    if options.generates:
        generation_request(options, model)  # fail on bad sizes before spending minutes on optimization
    if options.optimize or options.generates:
        return model, provider, ensure_optimized(options, model, provider)
    return model, provider, None


def open_pipeline(
    options: Options, model: ResolvedModel, provider: Provider, paths: OptimizedModel, request: GenerationRequest
) -> LoadedPipeline:
    folder = paths.unoptimized if options.test_unoptimized else paths.optimized
    return load_pipeline(
        folder,
        model.spec,
        provider=provider,
        device_id=options.device_id,
        shape=None if options.dynamic_dims else request.shape,
        model_label=options.model_id + (" (unoptimized)" if options.test_unoptimized else ""),
    )


def generate(
    options: Options, model: ResolvedModel, provider: Provider, paths: OptimizedModel, **callbacks
) -> list[GeneratedImage]:
    """Generate the images ``options`` ask for; ``callbacks`` go to :func:`text_to_image`."""
    request = generation_request(options, model)
    logger.info(
        "generating %d image(s) of %dx%d in %d call(s), seed %d",
        request.num_images,
        request.width,
        request.height,
        request.num_calls,
        request.seed,
    )
    loaded = open_pipeline(options, model, provider, paths, request)
    return text_to_image(loaded, request, output_dir=options.output_dir, **callbacks)
