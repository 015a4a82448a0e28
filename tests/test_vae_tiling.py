"""``--vae_tiling``: same-shape tiles that cover the latents, blended to a partition of unity, through the real CLI."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from sd_utils.runtime.vae_tiling import decode_in_slices, decode_tiled, tile_side, tile_starts
from stable_diffusion_xl import main


@pytest.mark.parametrize("length", [8, 9, 12, 16, 17, 25, 32, 33, 40, 128, 200])
@pytest.mark.parametrize("tile", [8, 64])
def test_tiles_have_one_shape_and_cover_the_axis_with_overlaps(length, tile):
    starts = tile_starts(length, tile)
    if length <= tile:
        assert starts == [0]
        return
    assert starts[0] == 0 and starts[-1] == length - tile  # every tile whole and inside: one pinned shape
    assert starts == sorted(set(starts))
    assert all(later - earlier <= tile - tile // 4 for earlier, later in itertools.pairwise(starts))


@pytest.mark.parametrize(("height", "width"), [(16, 16), (8, 8), (9, 31), (32, 12), (5, 40)])
def test_tiles_blend_back_to_the_whole_image(tiny_spec, height, width):
    """A decoder whose pixels depend only on the latent under them gives the same image tiled or whole: the tiles
    land where they belong and the blend weights sum to one everywhere."""
    factor = tiny_spec.vae_scale_factor

    def local(latents):
        return torch.tanh(latents[:, :3]).repeat_interleave(factor, -2).repeat_interleave(factor, -1) * 0.7 + 0.1

    latents = torch.randn((2, tiny_spec.latent_channels, height, width), generator=torch.Generator().manual_seed(0))
    calls = []
    tiled = decode_tiled(lambda tile: calls.append(tuple(tile.shape)) or local(tile), latents, tiny_spec)
    torch.testing.assert_close(tiled, local(latents), rtol=0, atol=1e-6)
    side = tile_side(tiny_spec)
    assert set(calls) == {(2, tiny_spec.latent_channels, min(height, side), min(width, side))}


def test_cli_decodes_tile_by_tile(tiny_optimized, tiny_spec, tmp_path):
    """The tiny model's tiles are 64x64 pixels: a 256x128 image is 5 x 3 of them, and the decoder session only
    takes that shape (its dims are pinned to it)."""
    from sd_utils.runtime.pipeline import load_pipeline
    from sd_utils.runtime.providers import PROVIDERS
    from sd_utils.sources.model_spec import Shape

    out = tmp_path / "out"
    args = tiny_optimized.tiny("--vae_tiling --width 256 --height 128 --num_inference_steps 3 --prompt x --seed 4")
    assert main([*args, "--output_dir", str(out)]) == 0
    (png,) = out.glob("*.png")
    image = Image.open(png)
    assert image.size == (256, 128)
    assert image.text["vae_tiling"] == "on"
    assert np.asarray(image).std() > 1  # not a flat image

    loaded = load_pipeline(
        tiny_optimized.build().optimized,
        tiny_spec,
        provider=PROVIDERS["cpu"],
        shape=Shape(batch=1, height=128, width=256),
        model_label="tiny",
        vae_tiling=True,
    )
    decoder = loaded.pipeline.vae_decoder.session
    side = tile_side(tiny_spec)
    tile = np.zeros((1, tiny_spec.latent_channels, side, side), dtype=np.float32)
    assert decoder.run(None, {"latent_sample": tile})[0].shape == (1, 3, 64, 64)
    with pytest.raises(Exception, match=r"(?i)dim|shape"):
        decoder.run(None, {"latent_sample": np.zeros((1, tiny_spec.latent_channels, 16, 32), dtype=np.float32)})


@pytest.mark.parametrize(
    ("batch", "side", "expected"), [(8, 1024, 4), (7, 1024, 7), (9, 1024, 3), (11, 1024, 1), (8, 512, 8), (2, 2048, 1)]
)
def test_the_decoder_takes_as_many_images_as_its_attention_scores_fit(tiny_spec, batch, side, expected):
    """CUDA's cuDNN failed the full-size decoder at batch 8, 1024² (BiasSoftmax: CUDNN_STATUS_NOT_SUPPORTED): its
    attention scores, 8 x 16384², pass 2³¹ elements. The decoder's batch dim is pinned to the slice it decodes."""
    from sd_utils.sources.model_spec import Shape, decoder_batch, submodel_io

    spec = dataclasses.replace(tiny_spec, vae_scale_factor=8)  # SDXL's VAE: 1024² is 16384 latent tokens
    shape = Shape(batch=batch, height=side, width=side)
    assert decoder_batch(spec, shape) == expected
    assert submodel_io(spec, "vae_decoder").dim_values(shape)["vae_decoder_batch"] == expected


def test_slices_decode_the_images_the_whole_batch_would(tiny_spec):
    """Slices of the batch go through a decoder that reuses its output buffer: each slice lands in its own images."""
    spec = dataclasses.replace(tiny_spec, vae_scale_factor=8)
    latents = torch.randn((8, tiny_spec.latent_channels, 128, 128), generator=torch.Generator().manual_seed(1))
    buffer, calls = {}, []

    def decode(part):
        calls.append(part.shape[0])
        out = buffer.setdefault(part.shape, torch.empty((part.shape[0], 3, 16, 16)))
        return out.copy_(part[:, :3, ::8, ::8])

    image = decode_in_slices(decode, latents, spec)
    assert calls == [4, 4]
    torch.testing.assert_close(image, latents[:, :3, ::8, ::8], rtol=0, atol=0)
    assert decode_in_slices(decode, latents[:2], spec).shape[0] == 2 and calls[-1] == 2  # fits: one call
