"""Prompt encoding, once per run: diffusers' ``encode_prompt`` over the pipeline's text encoders, whose lifetime
``--low_vram`` limits to the encoding itself."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any

from sd_utils.generation.request import GenerationRequest
from sd_utils.runtime.optimum_adapter import drop_parts
from sd_utils.runtime.pipeline import LoadedPipeline
from sd_utils.runtime.providers import memory_errors

logger = logging.getLogger(__name__)

# the pipeline's text encoders, in the order diffusers runs them (a refiner has only the second)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# what diffusers' ``encode_prompt`` returns, by the names its pipelines take them under
PROMPT_EMBEDDINGS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


def encode_prompt(loaded: LoadedPipeline, request: GenerationRequest, count: int) -> dict[str, Any]:
    """The embeddings of ``request``'s prompts for a pipeline call of ``count`` images, as the call's keyword arguments.

    diffusers' own ``encode_prompt`` runs the text encoders; here it runs once per prompt, not in every call of a run
    (and not again when a later run, in the window, has the same prompts). With ``low_vram`` the text encoders'
    sessions are made for it and dropped after it, so their weights (1.5 GiB for SDXL in fp16) are free while the
    UNet and the VAE decoder run; a new prompt makes them again.
    """
    key = (request.prompt, request.negative_prompt, count, request.uses_cfg)
    if key in loaded.prompt_embeddings:
        return loaded.prompt_embeddings[key]
    loaded.prompt_embeddings.clear()
    for option, text in (("--prompt", request.prompt), ("--negative_prompt", request.negative_prompt)):
        _note_truncation(loaded.pipeline.tokenizer_2, option, text)
    try:
        _open_text_encoders(loaded)
        with warnings.catch_warnings(), _without_truncation_notes():
            # optimum's text encoder reads its config through the attribute diffusers deprecates
            warnings.filterwarnings("ignore", message="Accessing config attribute", category=FutureWarning)
            embeddings = loaded.pipeline.encode_prompt(
                prompt=[request.prompt] * count,
                negative_prompt=[request.negative_prompt] * count if request.negative_prompt else None,
                do_classifier_free_guidance=request.uses_cfg,
            )
    finally:
        if loaded.low_vram:  # also after a failure: what was made for it goes again
            drop_parts(loaded.pipeline, TEXT_ENCODERS)
    loaded.prompt_embeddings[key] = dict(zip(PROMPT_EMBEDDINGS, embeddings, strict=True))
    return loaded.prompt_embeddings[key]


# diffusers' SDXL pipelines (whose encode_prompt optimum's run) note a cut prompt once per text encoder and call,
# with the whole dropped text; the tool says it once per run instead (_note_truncation)
_PIPELINE_LOGGERS = (
    "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl",
    "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img",
)


class _NoTruncationNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "was truncated because CLIP" not in record.getMessage()


@contextlib.contextmanager
def _without_truncation_notes() -> Iterator[None]:
    note = _NoTruncationNote()
    loggers = [logging.getLogger(name) for name in _PIPELINE_LOGGERS]
    for pipeline_logger in loggers:
        pipeline_logger.addFilter(note)
    try:
        yield
    finally:
        for pipeline_logger in loggers:
            pipeline_logger.removeFilter(note)


def _note_truncation(tokenizer, option: str, text: str | None) -> None:
    """Say once when ``text`` is longer than the text encoders take, and which words are dropped."""
    if not text:
        return
    ids = tokenizer(text, truncation=False).input_ids
    limit = tokenizer.model_max_length
    if len(ids) <= limit:
        return
    dropped = tokenizer.decode(ids[limit - 1 : -1])
    shown = dropped if len(dropped) <= 120 else f"{dropped[:58]} ... {dropped[-58:]}"
    logger.warning("%s is longer than the %d tokens SDXL reads: cut there, dropping %r", option, limit, shown)


def _open_text_encoders(loaded: LoadedPipeline) -> None:
    """Make the text-encoder sessions that ``low_vram`` dropped after the last prompt."""
    pipeline = loaded.pipeline
    missing = [name for name in TEXT_ENCODERS if name in loaded.spec.submodels and getattr(pipeline, name) is None]
    if not missing:
        return
    # the memory the last images' tensors took stays with ONNX Runtime, and each new session needs some beside it:
    # with 9 GiB free the second prompt of a 1024² window ran out here (bench/NOTES.md, run 13)
    doing = "loading the text encoders again for a new prompt (--low_vram)"
    with memory_errors(loaded.provider, doing, "keep the last prompt, or restart to start from free memory"):
        for name in missing:
            loaded.new_text_encoder(name)
