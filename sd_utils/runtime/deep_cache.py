"""DeepCache (``--cache_interval N``): the UNet's deep blocks change little from one denoising step to the next, so
the full UNet runs on steps 0, N, 2N, ... of a pipeline call and also hands out the input of its last up block (the
"refresh" graph); the steps between run only the UNet's outer blocks on that cached feature (the "shallow" graph:
time embedding, ``conv_in``, first down block, last up block, output layers). Ma et al., *DeepCache: Accelerating
Diffusion Models for Free* (CVPR 2024), with the branch at the UNet's top level, their shallowest choice.

Both graphs are built next to the plain UNet on first use (``optimize/unet_graphs.py``) and sit behind the pipeline's
UNet (``optimum_adapter.set_unet_forward``); the run starts each pipeline call with :meth:`CachedUNet.start`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

REFRESH = "unet_refresh"
SHALLOW = "unet_shallow"
GRAPHS = (REFRESH, SHALLOW)

Runner = Callable[[dict[str, Any]], list]  # a session's run on feeds by input name -> its outputs in order


class CachedUNet:
    """The pipeline's UNet under DeepCache: ``refresh(feeds)`` -> [noise, feature]; ``shallow(feeds)`` -> [noise],
    its feeds the UNet's that it reads (``shallow_inputs``) plus ``cache_feature``."""

    def __init__(self, refresh: Runner, shallow: Runner, shallow_inputs: tuple[str, ...]):
        self.refresh, self.shallow = refresh, shallow
        self.shallow_inputs = tuple(name for name in shallow_inputs if name != "cache_feature")
        self.interval = 1
        self.calls = 0  # UNet calls in this pipeline call
        self.refreshes = 0  # of which full UNet runs
        self._feature = None

    def start(self, interval: int) -> None:
        """A new pipeline call: its first step refreshes the cache, and every ``interval``-th after it."""
        self.interval, self.calls, self.refreshes, self._feature = interval, 0, 0, None

    def __call__(self, feeds: dict[str, Any]) -> Any:
        if self._feature is None or self.calls % self.interval == 0:
            noise, self._feature = self.refresh(feeds)[:2]
            self.refreshes += 1
        else:
            batch = np.shape(feeds["sample"])[0]
            feature = self._feature
            if np.shape(feature)[0] == 2 * batch:  # guidance was cut off since (--cfg_cutoff): the prompt's half
                feature = feature[batch:]
            noise = self.shallow({**{name: feeds[name] for name in self.shallow_inputs}, "cache_feature": feature})[0]
        self.calls += 1
        return noise


def refresh_output_shapes(latent_channels: int, cache_channels: int) -> Callable[[dict[str, Any]], list[tuple]]:
    """The refresh graph's outputs (CUDA-graph buffers): the noise prediction, then the feature, at the latents'
    batch, height and width."""

    def shapes(feeds: dict[str, Any]) -> list[tuple]:
        batch, _, height, width = np.shape(feeds["sample"])
        return [(batch, latent_channels, height, width), (batch, cache_channels, height, width)]

    return shapes
