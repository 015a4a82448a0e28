"""``--cfg_cutoff F``: classifier-free guidance for the first fraction ``F`` of a pipeline call's denoising steps
only; the rest run the UNet at batch 1 per image on the prompt alone (about half the UNet's work per step).

Done the way diffusers documents "dynamic classifier-free guidance": at the end of the cut-off step the step
callback sets the pipeline's guidance scale to 0 (its ``do_classifier_free_guidance`` turns false) and hands back
the conditional half of every CFG-doubled tensor of the loop (prompt embeddings, text embeddings, time ids, and the
inpainting masks or ControlNet images where the pipeline has them). The UNet session then meets a batch half as big,
which is why runs with a cut-off load it with its batch dimension free (``Shape.free_batch``).
"""

from __future__ import annotations

from typing import Any


def cut_step(steps: int, cutoff: float) -> int:
    """How many of a call's ``steps`` keep guidance (at least one)."""
    return max(1, round(cutoff * steps))


def _conditional_half(value: Any, batch: int) -> Any:
    """The second (prompt) half of a CFG-doubled tensor (or list of them, MultiControlNet's images); others as
    they are."""
    if isinstance(value, (list, tuple)):
        return type(value)(_conditional_half(item, batch) for item in value)
    shape = getattr(value, "shape", None)
    if shape is not None and len(shape) > 0 and shape[0] == 2 * batch:
        return value[batch:]
    return value


def drop_guidance(pipe, step: int, cutoff: float, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
    """diffusers' step-end callback part: after step ``cut_step`` of this call, no more guidance."""
    if cutoff >= 1 or not pipe.do_classifier_free_guidance or step + 1 != cut_step(pipe.num_timesteps, cutoff):
        return callback_kwargs
    pipe._guidance_scale = 0.0  # diffusers' documented switch (its do_classifier_free_guidance reads it)
    batch = callback_kwargs["latents"].shape[0]
    return {name: _conditional_half(value, batch) for name, value in callback_kwargs.items()}
