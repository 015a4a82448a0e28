"""Prompt encoding, once per run: A1111's prompt grammar (``prompt_syntax``) over the pipeline's ONNX text encoders,
whose lifetime ``--low_vram`` limits to the encoding itself."""

from __future__ import annotations

import logging
import warnings
from typing import Any

from sd_utils.generation import prompt_syntax
from sd_utils.generation.request import GenerationRequest
from sd_utils.runtime.optimum_adapter import drop_parts
from sd_utils.runtime.pipeline import LoadedPipeline
from sd_utils.runtime.providers import memory_errors

logger = logging.getLogger(__name__)

# the pipeline's text encoders and their tokenizers, in the order diffusers runs them (a refiner has only the second)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
TOKENIZERS = ("tokenizer", "tokenizer_2")


def encode_prompt(loaded: LoadedPipeline, request: GenerationRequest, count: int) -> dict[str, Any]:
    """The embeddings of ``request``'s prompts for a pipeline call of ``count`` images, as the call's keyword arguments.

    The prompts are read with A1111's grammar (``prompt_syntax``: weights, ``BREAK``, chunks of 75 tokens), each chunk
    encoded by the text encoders; the embeddings are those diffusers' ``encode_prompt`` makes (penultimate hidden
    states of both encoders side by side, the pooled output of the second), chunk after chunk along the sequence.
    They are made once per prompt, not in every call of a run (and not again when a later run, in the window, has the
    same prompts). With ``low_vram`` the text encoders' sessions are made for it and dropped after it, so their
    weights (1.5 GiB for SDXL in fp16) are free while the UNet and the VAE decoder run; a new prompt makes them again.
    """
    key = (request.prompt, request.negative_prompt, count, request.uses_cfg)
    if key in loaded.prompt_embeddings:
        return loaded.prompt_embeddings[key]
    loaded.prompt_embeddings.clear()
    try:
        _open_text_encoders(loaded)
        with warnings.catch_warnings():
            # optimum's text encoder reads its config through the attribute diffusers deprecates
            warnings.filterwarnings("ignore", message="Accessing config attribute", category=FutureWarning)
            loaded.prompt_embeddings[key] = _embeddings(loaded, request, count)
    finally:
        if loaded.low_vram:  # also after a failure: what was made for it goes again
            drop_parts(loaded.pipeline, TEXT_ENCODERS)
    return loaded.prompt_embeddings[key]


def _embeddings(loaded: LoadedPipeline, request: GenerationRequest, count: int) -> dict[str, Any]:
    """``count`` images' embeddings of the prompt and, with guidance, of the negative prompt (diffusers' rules: an empty
    negative prompt on a model with ``force_zeros_for_empty_prompt`` is zeros; the shorter of the two is padded with
    chunks of the empty prompt)."""
    import torch

    hidden, pooled = _encode(loaded, request.prompt, count)
    result = {"prompt_embeds": hidden, "pooled_prompt_embeds": pooled}
    result.update(negative_prompt_embeds=None, negative_pooled_prompt_embeds=None)
    if not request.uses_cfg:
        return result
    if not request.negative_prompt and loaded.pipeline.config.get("force_zeros_for_empty_prompt", False):
        result.update(
            negative_prompt_embeds=torch.zeros_like(hidden), negative_pooled_prompt_embeds=torch.zeros_like(pooled)
        )
        return result
    negative, negative_pooled = _encode(loaded, request.negative_prompt or "", count)
    if negative.shape[1] != hidden.shape[1]:
        empty, _ = _encode(loaded, "", count)
        hidden, negative = (
            _padded(states, empty, max(hidden.shape[1], negative.shape[1])) for states in (hidden, negative)
        )
    result.update(prompt_embeds=hidden, negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
    return result


def _padded(states, empty, length: int):
    """``states`` with chunks of the empty prompt's states appended up to ``length`` positions."""
    import torch

    missing = (length - states.shape[1]) // empty.shape[1]
    return torch.cat([states, *[empty] * missing], dim=1) if missing else states


def _encode(loaded: LoadedPipeline, text: str, count: int) -> tuple[Any, Any]:
    """(hidden states (count, 77 x chunks, width of both encoders), pooled (count, width of the second)) of ``text``
    (the encoders run at the batch their sessions are pinned to: the call's images)."""
    import torch

    pipeline = loaded.pipeline
    per_encoder, pooled = [], None
    for tokenizer_name, encoder_name in zip(TOKENIZERS, TEXT_ENCODERS, strict=True):
        tokenizer, encoder = getattr(pipeline, tokenizer_name, None), getattr(pipeline, encoder_name, None)
        if tokenizer is None or encoder is None:
            continue  # a refiner reads the second encoder alone
        states = []
        for index, chunk in enumerate(prompt_syntax.chunks(tokenizer, text, loaded.words)):
            ids = torch.tensor([chunk.ids] * count, device=pipeline.device)  # where optimum binds its inputs
            outputs = encoder(ids, output_hidden_states=True)
            if index == 0:
                pooled = outputs[0]  # diffusers: the last encoder's first output (text_embeds for encoder 2)
            states.append(_emphasised(outputs.hidden_states[-2], chunk.weights))
        per_encoder.append(torch.cat(states, dim=1))
    return torch.cat(per_encoder, dim=-1), pooled


def _emphasised(states, weights: tuple[float, ...]):
    """A1111's "Original" emphasis: each token's row times its weight, then the whole rescaled to its old mean.
    Unweighted chunks are returned as they are (the same bytes as a plain prompt's)."""
    import torch

    if all(weight == 1.0 for weight in weights):
        return states
    mean = states.mean()
    weighted = states * torch.tensor(weights, dtype=states.dtype, device=states.device).reshape(1, -1, 1)
    return weighted * (mean / weighted.mean())


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
