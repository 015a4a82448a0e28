"""``--vae_tiling``: same-shape tiles that cover the latents, blended to a partition of unity, through the real CLI."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from sd_utils.runtime.vae_tiling import decode_tiled, tile_side, tile_starts
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
