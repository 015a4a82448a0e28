"""Images a run starts from (img2img, the refiner) and inpainting masks: read, checked, converted and brought to
one size a batch can share."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from sd_utils.errors import UserInputError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BaseImage:
    path: Path
    image: object  # PIL.Image.Image, RGB, at the run's size


def load_base_images(paths: list[Path], *, size: tuple[int, int] | None, multiple: int) -> list[BaseImage]:
    """Open every file (all are checked before any work starts), convert to RGB and resize to one size.

    ``size`` (width, height) wins; otherwise the first image's size, rounded down to ``multiple`` (the latent grid of
    the UNet). Transparent pixels are composited over white rather than dropped to black.
    """
    from PIL import Image

    opened = _open_all(paths, "--base_images", _to_rgb)
    width, height = size or opened[0][1].size
    target = (width // multiple * multiple, height // multiple * multiple)
    if min(target) < multiple:
        raise UserInputError(
            f"--base_images {opened[0][0]} is {width}x{height}, smaller than the model's {multiple}-pixel grid; "
            f"use an image of at least {multiple}x{multiple}"
        )
    loaded = []
    for path, image in opened:
        if image.size != target:
            logger.info("resizing %s from %dx%d to %dx%d", path, *image.size, *target)
            image = image.resize(target, Image.Resampling.LANCZOS)
        loaded.append(BaseImage(path=path, image=image))
    return loaded


def load_masks(paths: list[Path], *, size: tuple[int, int]) -> list[BaseImage]:
    """Inpainting masks (white = repaint, black = keep) as 8-bit grayscale images of ``size`` (the run's)."""
    from PIL import Image

    masks = []
    for path, mask in _open_all(paths, "--mask_image", lambda image: image.convert("L")):
        if mask.size != size:
            logger.info("resizing the mask %s from %dx%d to %dx%d", path, *mask.size, *size)
            mask = mask.resize(size, Image.Resampling.BILINEAR)
        masks.append(BaseImage(path=path, image=mask))
    return masks


def _open_all(paths: list[Path], option: str, convert) -> list[tuple[Path, object]]:
    """Every file of ``option`` opened and converted, all checked before any work starts."""
    from PIL import Image, UnidentifiedImageError

    opened = []
    for path in paths:
        if not path.is_file():
            raise UserInputError(f"{option} {path}: no such file; give the path of a PNG or JPEG image")
        try:
            with Image.open(path) as image:
                image.load()
                opened.append((path, convert(_to_8_bit(image))))
        except (UnidentifiedImageError, OSError) as error:
            raise UserInputError(f"{option} {path} is not a readable image ({error}); give a PNG or JPEG") from None
    return opened


def _to_8_bit(image):
    """16-bit grayscale (PIL's "I;16*" and "I" modes) scaled from its 0-65535 range to 8 bits; PIL's own conversion
    clips it at 255, which reads a 16-bit image as white. Other modes as they are."""
    import numpy as np
    from PIL import Image

    if not (image.mode.startswith("I;16") or image.mode == "I"):
        return image
    values = np.asarray(image).astype(np.float64)
    return Image.fromarray(np.clip(np.round(values / 257), 0, 255).astype(np.uint8), mode="L")


def _to_rgb(image):
    from PIL import Image

    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
