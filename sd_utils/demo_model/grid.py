"""The README's picture: demo images made by the tool itself, with their prompts, in one grid.

    python -m sd_utils.demo_model.grid docs/demo.png [--models_dir models] [--cache_dir cache]

Runs the tool (``--model_id demo``) once per prompt (CPU, fixed seed), then lays the saved PNGs out with
their prompts underneath.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PROMPTS = (
    "a red circle on the left, light background",
    "a green square in the centre, dark background",
    "a blue triangle on the right, light background",
    "a yellow star in the centre, dark background",
    "a blue circle on the right, dark background",
    "a yellow square on the left, light background",
    "a red triangle in the centre, dark background",
    "a green star on the right, light background",
)
TILE, CAPTION, COLUMNS = 192, 40, 4


def make_grid(output: Path, *, models_dir: Path, cache_dir: Path, seed: int = 7) -> Path:
    from PIL import Image, ImageDraw

    from sd_utils import app
    from sd_utils.options import parse_options

    tiles = []
    with tempfile.TemporaryDirectory() as scratch:
        for index, prompt in enumerate(PROMPTS):
            out = Path(scratch) / str(index)
            args = ["--model_id", "demo", "--provider", "cpu", "--prompt", prompt, "--num_images", "1"]
            args += ["--seed", str(seed), "--guidance_scale", "9", "--num_inference_steps", "30"]
            args += ["--output_dir", str(out), "--models_dir", str(models_dir), "--cache_dir", str(cache_dir)]
            (image,) = app.run_once(parse_options(args))
            png = image.path
            tiles.append((Image.open(png).convert("RGB").resize((TILE, TILE), Image.Resampling.NEAREST), prompt))
    rows = -(-len(tiles) // COLUMNS)
    grid = Image.new("RGB", (COLUMNS * TILE, rows * (TILE + CAPTION)), "white")
    canvas = ImageDraw.Draw(grid)
    for index, (tile, prompt) in enumerate(tiles):
        x, y = (index % COLUMNS) * TILE, (index // COLUMNS) * (TILE + CAPTION)
        grid.paste(tile, (x, y))
        left, _, right = prompt.partition(", ")
        for line, text in enumerate((left, right)):
            canvas.text((x + 6, y + TILE + 4 + 16 * line), text, fill="black")
    output.parent.mkdir(parents=True, exist_ok=True)
    grid.save(output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--models_dir", type=Path, default=Path("models"))
    parser.add_argument("--cache_dir", type=Path, default=Path("cache"))
    args = parser.parse_args(argv)
    print(make_grid(args.output, models_dir=args.models_dir, cache_dir=args.cache_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
