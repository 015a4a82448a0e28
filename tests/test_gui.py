"""The --interactive window, for real: a Tk window on a virtual X display (Xvfb), driven with Tk events."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from sd_utils import app
from sd_utils.errors import OutOfMemoryError
from sd_utils.options import parse_options

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def _screenshot(root, name: str) -> None:
    """The window as the X server shows it, saved to test-artifacts/ (Pillow's X11 grab: no ImageMagick needed)."""
    from PIL import ImageGrab

    root.update()
    x, y = root.winfo_rootx(), root.winfo_rooty()
    image = ImageGrab.grab(bbox=(x, y, x + root.winfo_width(), y + root.winfo_height()), xdisplay=os.environ["DISPLAY"])
    assert image.size == (root.winfo_width(), root.winfo_height())
    assert len(set(image.getdata())) > 1, "the window shows nothing"
    ARTIFACTS.mkdir(exist_ok=True)
    image.save(ARTIFACTS / name)


@pytest.fixture(scope="module")
def display():
    """An X display: the one in $DISPLAY, else a private Xvfb started for these tests."""
    if os.environ.get("DISPLAY"):
        yield os.environ["DISPLAY"]
        return
    if not shutil.which("Xvfb"):
        pytest.skip("needs an X display or Xvfb (apt-get install xvfb)")
    read, write = os.pipe()
    server = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write), "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
        pass_fds=(write,),
        stderr=subprocess.DEVNULL,
    )
    os.close(write)
    with os.fdopen(read) as pipe:
        number = pipe.readline().strip()
    os.environ["DISPLAY"] = f":{number}"
    try:
        yield os.environ["DISPLAY"]
    finally:
        del os.environ["DISPLAY"]
        server.terminate()
        server.wait(10)


class MainThreadOnly:
    """Stands in for the Tcl interpreter object of a Tk root and records every call made off the main thread."""

    def __init__(self, tk):
        self._tk = tk
        self.foreign_calls: list[str] = []

    def __getattr__(self, name):
        attribute = getattr(self._tk, name)
        if not callable(attribute):
            return attribute

        def checked(*args, **kwargs):
            if threading.current_thread() is not threading.main_thread():
                self.foreign_calls.append(f"{name}{args[:2]}")
            return attribute(*args, **kwargs)

        return checked


def _window(workspace, tmp_path, *, extra: str = "", generate=None):
    import tkinter

    from sd_utils.ui.gui import GenerationWindow

    options = parse_options(
        workspace.tiny(f"--interactive --num_inference_steps 3 --seed 8 {extra}", "--output_dir", str(tmp_path / "out"))
    )
    job = app.plan(options)
    ready = app.prepare_models(options, job)
    root = tkinter.Tk()
    guard = MainThreadOnly(root.tk)
    root.tk = guard  # every widget made below talks to Tcl through the guard
    window = GenerationWindow(
        root, options=options, job=job, generate=generate or app.Generator(options, job, ready).generate
    )
    return root, window, guard


def _pump(root, until, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "the window did not finish in time"
        root.update()
        time.sleep(0.02)


def test_window_generates_into_the_grid(display, tiny_optimized, tmp_path):
    root, window, guard = _window(tiny_optimized, tmp_path, extra="--num_images 4 --batch_size 2")
    window.prompt.delete(0, "end")
    window.prompt.insert(0, "a red circle on the left")
    root.update()
    window.prompt.focus_force()
    window.prompt.event_generate("<Return>")  # a real key event, bound like pressing Enter
    _pump(root, lambda: window.worker is not None)
    assert window.button.instate(["disabled"])
    _pump(root, lambda: not window.running and window.events.empty() and window.button.instate(["!disabled"]))
    shown = [cell for cell in window.cells if cell.cget("image")]
    assert len(shown) == 4
    assert len(list((tmp_path / "out").glob("*.png"))) == 4
    assert float(window.progress.cget("value")) == float(window.progress.cget("maximum")) == 2 * 3
    assert window.status.cget("text").startswith("Done: 4 image(s)")
    assert guard.foreign_calls == [], "Tk was touched from the worker thread"
    _screenshot(root, "gui.png")
    # a second run with the Generate button, the loaded sessions are reused
    window.button.invoke()
    _pump(root, lambda: not window.running and window.events.empty() and window.button.instate(["!disabled"]))
    assert len(list((tmp_path / "out").glob("*.png"))) == 8
    window.close()
    assert not _exists(root)


def test_window_with_low_vram_takes_a_new_prompt(display, tiny_optimized, tmp_path):
    """``--low_vram`` in the window: the text encoders are dropped after each prompt and made again for a new one."""
    from PIL import Image

    root, window, guard = _window(tiny_optimized, tmp_path, extra="--low_vram --num_images 1")
    for prompt in ("a red circle on the left", "a green square"):
        window.prompt.delete(0, "end")
        window.prompt.insert(0, prompt)
        window.button.invoke()
        _pump(root, lambda: not window.running and window.events.empty() and window.button.instate(["!disabled"]))
        assert window.status.cget("text").startswith("Done: 1 image(s)")
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert [Image.open(png).text["prompt"] for png in pngs] == ["a red circle on the left", "a green square"]
    assert all(Image.open(png).text["vae_tiling"] == "on" for png in pngs)
    assert guard.foreign_calls == []
    window.close()


def _exists(root) -> bool:
    try:
        return bool(root.winfo_exists())
    except Exception:  # noqa: BLE001 - a destroyed root raises TclError
        return False


@pytest.mark.parametrize(
    ("error", "shown"),
    [
        (RuntimeError("the GPU caught fire"), "Error: RuntimeError: the GPU caught fire"),
        # the tool's own errors say what to change, without a class name
        (OutOfMemoryError("--provider cuda ran out of GPU memory"), "Error: --provider cuda ran out of GPU memory"),
    ],
)
def test_failing_generation_shows_the_error_and_reenables(display, tiny_optimized, tmp_path, error, shown):
    def broken(request, **callbacks):
        callbacks["on_step"](1, 3)
        raise error

    root, window, guard = _window(tiny_optimized, tmp_path, generate=broken)
    window.prompt.insert(0, "x")
    window.button.invoke()
    _pump(root, lambda: "Error" in window.status.cget("text"), timeout=30)
    assert window.status.cget("text") == shown
    _pump(root, lambda: window.button.instate(["!disabled"]), timeout=10)
    assert guard.foreign_calls == []
    window.close()


def test_a_long_error_wraps_instead_of_widening_the_window(display, tiny_optimized, tmp_path):
    def broken(request, **callbacks):
        raise RuntimeError("the provider failed: " + "a very long message " * 100)

    root, window, _ = _window(tiny_optimized, tmp_path, generate=broken)
    root.update_idletasks()
    width = root.winfo_reqwidth()
    window.prompt.insert(0, "x")
    window.button.invoke()
    _pump(root, lambda: "Error" in window.status.cget("text"), timeout=30)
    root.update_idletasks()
    assert root.winfo_reqwidth() <= width + 4  # the Stop button stays in view
    window.close()


def test_num_images_is_clamped_to_nine(display, tiny_optimized, tmp_path):
    _root, window, _ = _window(tiny_optimized, tmp_path, extra="--num_images 20")
    assert len(window.cells) == 9
    assert "at most 9" in window.status.cget("text")
    window.close()


def test_closing_mid_run_stops_cleanly(display, tiny_optimized, tmp_path):
    root, window, _ = _window(tiny_optimized, tmp_path, extra="--num_images 2 --num_inference_steps 400")
    window.prompt.insert(0, "x")
    window.button.invoke()
    _pump(root, lambda: float(window.progress.cget("value")) >= 2, timeout=120)
    window.close()
    _pump(root, lambda: not _exists(root), timeout=60)
    assert not window.worker.is_alive()
    out = tmp_path / "out"
    assert not out.exists() or not list(out.iterdir()), "a stopped run saves nothing, half-written or not"


def _set(entry, text: str) -> None:
    entry.delete(0, "end")
    entry.insert(0, text)


def test_window_settings_drive_the_run_and_stay_for_the_next(display, tiny_optimized, tmp_path):
    """Negative prompt, steps, guidance, its cut-off, a random seed, width x height, scheduler and number of images,
    set in the window's own controls, are what the run uses (PNG metadata); they stay set for the next run; Stop ends a
    run after the current step; a screenshot of the window with its settings is kept."""
    from PIL import Image

    root, window, guard = _window(tiny_optimized, tmp_path)
    _set(window.prompt, "a blue square")
    _set(window.negative_prompt, "blurry")
    for option, text in (
        ("num_inference_steps", "2"),
        ("guidance_scale", "3.5"),
        ("seed", "random"),
        ("cfg_cutoff", "0.5"),
    ):
        _set(window.settings[option], text)
    for option, text in (("width", "128"), ("height", "64"), ("num_images", "2")):
        _set(window.settings[option], text)
    window.scheduler.set("euler_a")
    root.update()
    window.button.invoke()
    _pump(root, lambda: not window.running and window.events.empty() and window.button.instate(["!disabled"]))
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert len(pngs) == 2
    texts = [Image.open(png).text for png in pngs]
    assert {text["negative_prompt"] for text in texts} == {"blurry"}
    assert {
        (text["num_inference_steps"], text["guidance_scale"], text["scheduler"], text["cfg_cutoff"]) for text in texts
    } == {("2", "3.5", "euler_a", "0.5")}
    assert {Image.open(png).size for png in pngs} == {(128, 64)}
    assert window.settings["seed"].get() == "random" and window.scheduler.get() == "euler_a"  # kept for the next run
    _screenshot(root, "gui-settings.png")
    # Stop: a long run ends after the current step, the stopped call saves nothing
    _set(window.settings["num_inference_steps"], "400")
    window.button.invoke()
    _pump(root, lambda: float(window.progress.cget("value")) >= 2, timeout=120)
    window.stop_button.invoke()
    _pump(root, lambda: not window.running and window.events.empty() and window.button.instate(["!disabled"]))
    assert window.status.cget("text").startswith("Stopped: 0 image(s)")
    assert len(list((tmp_path / "out").glob("*.png"))) == 2
    _set(window.settings["guidance_scale"], "lots")
    window.button.invoke()
    assert window.status.cget("text") == "Error: Guidance 'lots' is not a number"
    assert guard.foreign_calls == []
    window.close()


def test_window_switches_loras_without_a_build(display, tiny_optimized, tmp_path):
    """The LoRA list: a --lora_dir name, then another at another scale, then none, in one window session; each run
    gives the image the command line gives for that set, and no Olive workflow runs."""
    import numpy as np
    from lora_files import write_kohya_lora, write_peft_lora
    from PIL import Image

    from stable_diffusion_xl import main
    from tests.test_parity import psnr

    root_folder = tiny_optimized.models_dir / "builtin" / "tiny"
    loras = tmp_path / "loras"
    write_peft_lora(root_folder, loras / "style_peft.safetensors")
    write_kohya_lora(root_folder, loras / "detail_kohya.safetensors", text_encoders=True)
    builds = tiny_optimized.build_names()
    root, window, guard = _window(tiny_optimized, tmp_path, extra=f"--lora_dir {loras}")
    assert sorted(window.lora_list.names) == ["detail_kohya", "style_peft"]
    window.prompt.delete(0, "end")
    window.prompt.insert(0, "a blue square")
    sets = [("style_peft", "1.0"), ("detail_kohya", "0.6"), None]
    for index, chosen in enumerate(sets):
        window.lora_list.clear()
        if chosen is not None:
            window.lora_list.name.set(chosen[0])
            window.lora_list.scale.delete(0, "end")
            window.lora_list.scale.insert(0, chosen[1])
            window.lora_list.add_named()
        assert window.lora_list.listbox.get(0, "end") == ((f"{chosen[0]}  x{float(chosen[1]):g}",) if chosen else ())
        window.button.invoke()
        _pump(root, lambda: not window.running and window.events.empty() and window.button.instate(["!disabled"]))
        assert window.status.cget("text").startswith("Done: 1 image(s)"), window.status.cget("text")
        (shown,) = [Path(cell.image_path) for cell in window.cells if cell.cget("image")]
        cli = tmp_path / f"cli{index}"
        extra = ["--lora", f"{loras / chosen[0]}.safetensors:{chosen[1]}"] if chosen else []
        args = tiny_optimized.tiny(
            "--num_inference_steps 3 --seed 8 --prompt", "a blue square", "--output_dir", str(cli)
        )
        assert main([*args, *extra]) == 0
        (expected,) = cli.glob("*.png")
        pixels = [np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255 for path in (expected, shown)]
        assert psnr(*pixels) >= 60, chosen
    assert tiny_optimized.build_names() == builds
    assert guard.foreign_calls == []
    window.close()


def test_window_takes_a_control_image_and_scale(display, tiny_optimized, tmp_path):
    """With --controlnet: the preview shows the canny map, another image and scale picked in the window give the
    image the command line gives for them."""
    import numpy as np
    from lora_files import write_controlnet
    from PIL import Image, ImageDraw

    from stable_diffusion_xl import main
    from tests.test_parity import psnr

    net = write_controlnet(tiny_optimized.models_dir / "builtin" / "tiny", tmp_path / "canny")
    first, second = tmp_path / "first.png", tmp_path / "second.png"
    for path, box in ((first, (10, 10, 60, 60)), (second, (40, 20, 120, 110))):
        image = Image.new("RGB", (128, 128), "black")
        ImageDraw.Draw(image).ellipse(box, fill="white")
        image.save(path)
    control = f"--controlnet {net}:1.0 --control_image {first} --control_preprocess canny"
    root, window, guard = _window(tiny_optimized, tmp_path, extra=control)
    root.update()
    assert window.control.previews[0].cget("image")  # the canny map is shown
    window.control.set_image(0, second)
    window.control.scales[0].delete(0, "end")
    window.control.scales[0].insert(0, "0.6")
    window.prompt.delete(0, "end")
    window.prompt.insert(0, "a ring")
    window.button.invoke()
    _pump(root, lambda: not window.running and window.events.empty() and window.button.instate(["!disabled"]))
    assert window.status.cget("text").startswith("Done: 1 image(s)"), window.status.cget("text")
    (shown,) = [Path(cell.image_path) for cell in window.cells if cell.cget("image")]
    cli = tmp_path / "cli"
    args = tiny_optimized.tiny("--num_inference_steps 3 --seed 8 --prompt", "a ring", "--output_dir", str(cli))
    assert (
        main([*args, "--controlnet", f"{net}:0.6", "--control_image", str(second), "--control_preprocess", "canny"])
        == 0
    )
    (expected,) = cli.glob("*.png")
    pixels = [np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255 for path in (expected, shown)]
    assert psnr(*pixels) >= 60
    assert guard.foreign_calls == []
    window.close()
