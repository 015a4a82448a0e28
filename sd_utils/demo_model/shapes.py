"""The demo model's world: coloured shapes on plain backgrounds, drawn in code, and a judge that reads them back.

A scene is one shape (circle, square, triangle, star) in one colour, at the left, centre or right of a 64x64 image
with a light or dark background; its caption says all four ("a red circle on the left, dark background"). The judge
recovers colour (the palette colour nearest in hue to the foreground), shape (the shape whose outline, drawn into
the foreground's bounding box, overlaps it best) and position (the foreground's centroid), so a user and a test can
score what a model draws without looking.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

SIZE = 64
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 40)}
SHAPES = ("circle", "square", "triangle", "star")
POSITIONS = {"left": 16, "centre": 32, "right": 48}  # x of the shape's centre
BACKGROUNDS = {"light": (235, 235, 230), "dark": (30, 30, 36)}
POSITION_WORDS = {"left": "on the left", "centre": "in the centre", "right": "on the right"}


@dataclasses.dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} {POSITION_WORDS[self.position]}, {self.background} background"


ALL_SCENES = tuple(
    Scene(colour, shape, position, background)
    for colour, shape, position, background in itertools.product(COLOURS, SHAPES, POSITIONS, BACKGROUNDS)
)


def _polygon(shape: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    if shape == "square":
        r = radius * 0.85
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        # isosceles, apex up, base as wide as it is tall: fills half its bounding box
        return [(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)]
    # star: five points, inner radius 0.38 of the outer
    points = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * 0.38
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def draw(scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
    """The scene as a 64x64 RGB uint8 array; ``rng`` jitters size, place and shade a little (training data)."""
    from PIL import Image, ImageDraw

    jitter = (lambda low, high: rng.uniform(low, high)) if rng is not None else (lambda low, high: 0.0)
    background = tuple(int(np.clip(c + jitter(-12, 12), 0, 255)) for c in BACKGROUNDS[scene.background])
    colour = tuple(int(np.clip(c + jitter(-20, 20), 0, 255)) for c in COLOURS[scene.colour])
    # drawn at 4x and downsampled: anti-aliased edges, like the images a VAE learns to reproduce
    image = Image.new("RGB", (SIZE * SCALE, SIZE * SCALE), background)
    radius = 11 + jitter(-2, 3)
    cx, cy = POSITIONS[scene.position] + jitter(-3, 3), 32 + jitter(-6, 6)
    _paint(ImageDraw.Draw(image), scene.shape, cx, cy, radius, colour)
    return np.asarray(image.resize((SIZE, SIZE), Image.Resampling.LANCZOS))


SCALE = 4  # shapes are drawn at 4x and downsampled: anti-aliased edges, like the images a VAE learns to reproduce


def _paint(canvas, shape: str, cx: float, cy: float, radius: float, fill) -> None:
    """Draw ``shape`` centred at (cx, cy) in image pixels on a canvas SCALE times larger."""
    cx, cy, radius = cx * SCALE, cy * SCALE, radius * SCALE
    if shape == "circle":
        canvas.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    else:
        canvas.polygon(_polygon(shape, cx, cy, radius), fill=fill)


# width of each shape's bounding box in radii, and how far below the box's middle its centre lies (in radii)
BOX_WIDTH = {"circle": 2.0, "square": 1.7, "triangle": 2.0, "star": 2 * math.sin(2 * math.pi / 5)}
CENTRE_DROP = {"circle": 0.0, "square": 0.0, "triangle": 0.0, "star": (1 - math.cos(math.pi / 5)) / 2}


def _template_iou(mask: np.ndarray, shape: str) -> float:
    """Intersection over union of ``mask`` with ``shape`` drawn to fill the mask's bounding box."""
    from PIL import Image, ImageDraw

    rows, cols = np.nonzero(mask)
    radius = (np.ptp(cols) + 1) / BOX_WIDTH[shape]
    cx = (cols.min() + cols.max() + 1) / 2
    cy = (rows.min() + rows.max() + 1) / 2 + CENTRE_DROP[shape] * radius
    height, width = mask.shape
    image = Image.new("L", (width * SCALE, height * SCALE), 0)
    _paint(ImageDraw.Draw(image), shape, cx, cy, radius, 255)
    template = np.asarray(image.resize((width, height), Image.Resampling.BOX)) > 127
    return float((template & mask).sum() / max(1, (template | mask).sum()))


@dataclasses.dataclass(frozen=True)
class Verdict:
    colour: str | None
    shape: str | None
    position: str | None
    background: str

    def matches(self, scene: Scene) -> bool:
        """Colour and shape right: what the quality check counts."""
        return self.colour == scene.colour and self.shape == scene.shape


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees of RGB values in [0, 255] (shape (..., 3))."""
    import colorsys

    return np.array([colorsys.rgb_to_hsv(*(pixel / 255))[0] * 360 for pixel in rgb.reshape(-1, 3)])


HUES = {name: float(_hue(np.array(rgb, dtype=np.float32))[0]) for name, rgb in COLOURS.items()}


def judge(image: np.ndarray) -> Verdict:
    """Read colour, shape, position and background back from an RGB image (any size; uint8 or float in [0, 1]).

    The foreground is what differs from the border's median colour; its colour is named by hue (robust to the
    shading and halos a generated image has), and the shape is measured on the pixels close to that colour.
    """
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.max() <= 1.0:
        pixels = pixels * 255
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    background_name = "light" if background.mean() > 128 else "dark"
    saturation = pixels.max(axis=-1) - pixels.min(axis=-1)
    candidates = (np.linalg.norm(pixels - background, axis=-1) > 60) & (saturation > 60)
    if candidates.sum() < 12:  # nothing coloured drawn
        return Verdict(None, None, None, background_name)
    hue = np.median(_hue(pixels[candidates]))
    colour_name = min(HUES, key=lambda name: min(abs(HUES[name] - hue), 360 - abs(HUES[name] - hue)))
    # the shape: the pixels nearer the drawn colour than the background
    colour = np.median(pixels[candidates], axis=0)
    mask = np.linalg.norm(pixels - colour, axis=-1) < np.linalg.norm(pixels - background, axis=-1)
    shape_name = max(SHAPES, key=lambda name: _template_iou(mask, name))
    x = np.nonzero(mask)[1].mean() / pixels.shape[1]
    position_name = "left" if x < 1 / 3 else "right" if x > 2 / 3 else "centre"
    return Verdict(colour_name, shape_name, position_name, background_name)


def dataset(count: int, *, seed: int) -> tuple[np.ndarray, list[Scene]]:
    """``count`` jittered scenes (all combinations in turn, shuffled) as a uint8 array (count, 64, 64, 3)."""
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(ALL_SCENES)) for _ in range(-(-count // len(ALL_SCENES)))])[:count]
    scenes = [ALL_SCENES[i] for i in order]
    return np.stack([draw(scene, rng) for scene in scenes]), scenes
