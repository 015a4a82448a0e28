"""Control images for ControlNets: read, sized to the run, and (``--control_preprocess canny``) turned into the map
the ControlNet was trained on.

Only what a well-kept library does on the CPU is made here: Canny edges, by OpenCV. Depth maps and pose skeletons
need models of their own (MiDaS/ZoeDepth, OpenPose/DWPose) that the tool does not ship: make those maps with them
(or A1111's ControlNet preprocessors) and pass the map with ``--control_preprocess none``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from sd_utils.errors import UserInputError

PREPROCESSORS = ("none", "canny")


@dataclasses.dataclass(frozen=True)
class ControlImage:
    """One ``--control_image``: its file and the map the ControlNet reads (RGB, the run's size)."""

    path: Path
    image: object  # PIL.Image.Image
    preprocess: str = "none"


def canny(image, low: int, high: int):
    """OpenCV's Canny edges of ``image`` (a PIL image) with hysteresis thresholds ``low`` and ``high``, as the
    white-on-black RGB map canny ControlNets were trained on."""
    import cv2
    from PIL import Image

    gray = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(gray, low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def load_control_image(
    path: Path, *, size: tuple[int, int], preprocess: str = "none", low: int = 100, high: int = 200
) -> ControlImage:
    """``--control_image path`` resized to ``size`` (width, height) and preprocessed; one-line
    :class:`UserInputError` when it is missing or no image."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserInputError(f"--control_image {path}: no such file; give the control image (a PNG or JPEG)")
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise UserInputError(f"--control_image {path} is not a readable image ({error}); give a PNG or JPEG") from None
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    if preprocess == "canny":
        image = canny(image, low, high)
    return ControlImage(path=path, image=image, preprocess=preprocess)
