"""docs/window.png: the window on the demo model, with neutral folders in its status line.

cd SCRATCH && DISPLAY=:N python PROJECT/bench/experiments/window_png.py   # SCRATCH/models gets the demo model
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_DIR))
os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")
os.environ.setdefault("OTEL_SDK_DISABLED", "true")


def main() -> None:
    import tkinter

    from sd_utils import app
    from sd_utils.options import parse_options
    from sd_utils.ui.gui import GenerationWindow

    run = "--num_images 4 --num_inference_steps 25 --guidance_scale 9 --seed 7 --image_size 64"
    options = parse_options(
        ["--interactive", "--model_id", "demo", "--provider", "cpu", *run.split(), "--negative_prompt", "(blurry:1.2)"]
    )
    job = app.plan(options)
    ready = app.prepare_models(options, job)
    root = tkinter.Tk()
    window = GenerationWindow(root, options=options, job=job, generate=app.Generator(options, job, ready).generate)
    window.prompt.insert(0, "a (yellow:1.1) star in the centre, dark background")
    window.button.invoke()
    deadline = time.monotonic() + 300
    while "Done" not in window.status.cget("text") and time.monotonic() < deadline:
        root.update()
        time.sleep(0.05)
    for _ in range(20):  # the thumbnails drawn
        root.update()
        time.sleep(0.05)
    shot = PROJECT_DIR / "docs" / "window.png"
    subprocess.run(["import", "-window", str(root.winfo_id()), str(shot)], check=True, timeout=30)
    print(window.status.cget("text"))


if __name__ == "__main__":
    main()
