"""``--vae_tiling``: decode the latents in overlapping tiles, for GPUs too small for the VAE decoder's full image.

The VAE decoder runs last and needs the most memory for its activations: at 1024² its mid-block attention alone
holds a 16384 x 16384 score matrix, and its last up-block 1-GiB fp32 tensors. Tiles of half the model's native side
(512 px for SDXL) need about a quarter of its activations at a time (figures: bench/NOTES.md, runs 9, 11 and 12).

diffusers' ``AutoencoderKL.tiled_decode`` does this for its PyTorch VAE, with edge tiles smaller than the others;
written again here because ONNX Runtime sessions are pinned to one input shape (static dims): every tile here has
the same shape (tiles spread evenly, their overlap at least a quarter tile), and the overlaps are blended with
linear ramps normalized to a partition of unity. The decoder's attention then sees one tile at a time, so pixels
differ slightly from a whole-image decode (as with diffusers' tiling).

Every decode, tiled or not, also takes the batch in slices where its attention scores would not fit one call
(:func:`decode_in_slices`; diffusers' ``enable_vae_slicing`` decodes image by image for the same reason).
"""

from __future__ import annotations

import math
from typing import Any

from sd_utils.sources.model_spec import ModelSpec, Shape, decoder_batch


def tile_side(spec: ModelSpec) -> int:
    """Latents per tile side: half the model's native image side (64 latents, 512 px, for SDXL)."""
    return max(1, spec.default_image_size // spec.vae_scale_factor // 2)


def tile_length(spec: ModelSpec, latents: int) -> int:
    """Latents per tile along an axis of ``latents``: the tile side, or the whole axis when shorter."""
    return min(latents, tile_side(spec))


def tile_starts(length: int, tile: int) -> list[int]:
    """Where the tiles of one axis start: evenly spread over ``length`` latents, each ``tile`` long (the axis itself
    when shorter), neighbours overlapping by at least a quarter tile."""
    if length <= tile:
        return [0]
    overlap = max(1, tile // 4)
    count = math.ceil((length - overlap) / (tile - overlap))
    return [round(index * (length - tile) / (count - 1)) for index in range(count)]


def tiled_shape(spec: ModelSpec, shape: Shape) -> Shape:
    """The shape the tiled decoder runs at (its dims are pinned to it), for images of ``shape``."""
    factor = spec.vae_scale_factor
    height, width = (tile_length(spec, size // factor) * factor for size in (shape.height, shape.width))
    return Shape(batch=shape.batch, height=height, width=width, classifier_free_guidance=shape.classifier_free_guidance)


def _ramps(starts: list[int], tile: int, factor: int, **tensor_options) -> list[Any]:
    """The blend weight of each tile along one axis, in pixels: 1 inside, rising from the tile's edge across its
    overlap with the tile before, falling across its overlap with the tile after."""
    import torch

    positions = torch.arange(tile * factor, **tensor_options) + 0.5
    ramps = []
    for index, start in enumerate(starts):
        weight = torch.ones(tile * factor, **tensor_options)
        if index > 0:
            rise = (starts[index - 1] + tile - start) * factor
            weight = torch.minimum(weight, positions / rise)
        if index + 1 < len(starts):
            fall = (start + tile - starts[index + 1]) * factor
            weight = torch.minimum(weight, (tile * factor - positions) / fall)
        ramps.append(weight)
    return ramps


def decode_tiled(decode, latents, spec: ModelSpec):
    """``decode`` (latents of one tile -> its pixels) applied tile by tile to ``latents`` (N, C, H, W), blended into
    the whole image (N, 3, H x factor, W x factor), on the latents' device."""
    import torch

    factor = spec.vae_scale_factor
    height, width = latents.shape[-2:]
    tile_h, tile_w = tile_length(spec, height), tile_length(spec, width)
    rows, columns = tile_starts(height, tile_h), tile_starts(width, tile_w)
    options = {"device": latents.device, "dtype": torch.float32}
    row_ramps, column_ramps = _ramps(rows, tile_h, factor, **options), _ramps(columns, tile_w, factor, **options)
    image = weights = None
    for top, row_ramp in zip(rows, row_ramps, strict=True):
        for left, column_ramp in zip(columns, column_ramps, strict=True):
            pixels = decode(latents[:, :, top : top + tile_h, left : left + tile_w].contiguous()).float()
            if image is None:
                image = torch.zeros((*pixels.shape[:2], height * factor, width * factor), **options)
                weights = torch.zeros((height * factor, width * factor), **options)
            weight = row_ramp[:, None] * column_ramp[None, :]
            rows_out = slice(top * factor, (top + tile_h) * factor)
            columns_out = slice(left * factor, (left + tile_w) * factor)
            image[:, :, rows_out, columns_out] += pixels * weight  # added at once: the decoder may reuse its output
            weights[rows_out, columns_out] += weight
    return image / weights


def decode_in_slices(decode, latents, spec: ModelSpec):
    """``decode`` applied to :func:`decoder_batch` images of ``latents`` (N, C, H, W) at a time (all N where they fit
    in one call), the pixels gathered on the latents' device."""
    count, _, height, width = latents.shape
    factor = spec.vae_scale_factor
    size = decoder_batch(spec, Shape(batch=count, height=height * factor, width=width * factor))
    if size >= count:
        return decode(latents)
    image = None
    for start in range(0, count, size):
        pixels = decode(latents[start : start + size].contiguous())
        if image is None:
            image = pixels.new_empty((count, *pixels.shape[1:]))
        image[start : start + size] = pixels  # copied at once: the decoder may reuse its output
    return image
