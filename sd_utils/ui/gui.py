"""The ``--interactive`` window: a client of the same generation path as the CLI, not a fork of it.

Tk is single-threaded: only the main thread touches widgets. Generation runs on a worker thread that reports
progress, images, completion and errors through a ``queue.Queue``, which the main thread drains every
:data:`POLL_MS` milliseconds with ``after()``. Closing the window mid-run asks the worker to stop after its current
denoising step (nothing of that call is saved) and waits for it before the window goes.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from sd_utils.app import Generator, Job, ReadyModels, generation_request
from sd_utils.errors import SdxlOliveError, UserInputError
from sd_utils.generation.request import GeneratedImage, GenerationRequest
from sd_utils.options import Options, check_options
from sd_utils.ui.control_panel import ControlPanel
from sd_utils.ui.lora_list import LoraList

logger = logging.getLogger(__name__)

MAX_IMAGES = 9
COLUMNS = 3
THUMBNAIL = 256
POLL_MS = 50

# what the worker thread may send: ("step", (done, total)), ("image", GeneratedImage), ("done", count),
# ("error", message)
Event = tuple[str, Any]
GenerateFunction = Callable[..., list[GeneratedImage]]  # (request, on_step=, on_image=, should_stop=)


RANDOM_SEED = "random"
MODEL_SCHEDULER = "model default"


@dataclasses.dataclass(frozen=True)
class Setting:
    """One settings control: the option it sets, its label, how its text becomes the option's value."""

    option: str
    label: str
    width: int
    parse: Callable[[str], Any]


def _seed(text: str) -> int | None:
    return None if text.strip().lower() in ("", RANDOM_SEED) else int(text)


def _scheduler(text: str) -> str | None:
    return None if text == MODEL_SCHEDULER else text


SETTINGS = (
    Setting("num_inference_steps", "Steps", 5, int),
    Setting("guidance_scale", "Guidance", 5, float),
    Setting("cfg_cutoff", "CFG until", 4, float),
    Setting("cache_interval", "Cache every", 3, int),
    Setting("seed", "Seed", 11, _seed),
    Setting("width", "Width", 6, int),
    Setting("height", "Height", 6, int),
    Setting("num_images", "Images", 3, int),
)


class GenerationWindow:
    """Prompt and negative prompt, the run's settings (steps, guidance, seed or "random", size, scheduler, number of
    images), the run-time LoRAs with their scales, the ControlNets' scales and images (with ``--controlnet``), Generate
    and Stop buttons, a progress bar over all steps of a run, and a grid of up to 9 images. The settings stay as
    they were between runs; each run reads them afresh."""

    def __init__(self, root, *, options: Options, job: Job, generate: GenerateFunction):
        from tkinter import ttk

        self.root = root
        self.job = job
        self.generate_function = generate
        if options.num_images > MAX_IMAGES:
            logger.info(
                "the window shows at most %d images: --num_images %d is clamped", MAX_IMAGES, options.num_images
            )
        self.options = dataclasses.replace(options, num_images=min(options.num_images, MAX_IMAGES))
        self.events: queue.Queue[Event] = queue.Queue()
        self.stop = threading.Event()
        self.worker: threading.Thread | None = None
        self.last_request: GenerationRequest | None = None
        self.closing = False
        self.thumbnails: list[Any] = []  # PhotoImages must stay referenced while shown

        root.title(f"sdxl-olive — {job.model.model_id} ({job.provider.name})")
        frame = ttk.Frame(root, padding=8)
        frame.grid(sticky="nsew")
        self._build_prompts(frame, options)
        self._build_settings(frame)
        # run-time LoRAs; --fuse_loras ones are part of the build (the model line names them)
        initial = () if options.fuse_loras else options.lora
        self.lora_list = LoraList(frame, row=3, columns=COLUMNS, loras=initial, lora_dirs=options.lora_dir)
        self.control = ControlPanel(frame, row=4, columns=COLUMNS, options=options) if options.controlnet else None
        self.progress = ttk.Progressbar(frame, mode="determinate", maximum=1)
        self.progress.grid(row=5, column=0, columnspan=COLUMNS, sticky="ew", pady=4)
        self.status = ttk.Label(frame, text=self._ready_text())
        self.status.grid(row=6, column=0, columnspan=COLUMNS, sticky="w")
        # a long message wraps at the frame's width instead of widening the window past the screen (and Stop)
        root.update_idletasks()
        self.status.configure(wraplength=max(200, frame.winfo_reqwidth() - 16))
        frame.bind("<Configure>", lambda event: self.status.configure(wraplength=max(200, event.width - 16)))
        grid = ttk.Frame(frame)
        grid.grid(row=7, column=0, columnspan=COLUMNS, sticky="w")
        self.cells = [ttk.Label(grid) for _ in range(MAX_IMAGES)]
        for index, cell in enumerate(self.cells):
            cell.grid(row=index // COLUMNS, column=index % COLUMNS, padx=2, pady=2)
        vae = f" · VAE {options.use_fp16_fixed_vae}" if options.use_fp16_fixed_vae else ""
        self.model_label = ttk.Label(frame, text=f"Model: {job.model.describe()}{vae}")
        self.model_label.grid(row=8, column=0, columnspan=COLUMNS, sticky="w")
        root.protocol("WM_DELETE_WINDOW", self.close)
        self.prompt.focus_set()
        root.after(POLL_MS, self._poll)

    def _build_prompts(self, frame, options: Options) -> None:
        from tkinter import ttk

        self.prompt = ttk.Entry(frame, width=60)
        self.prompt.insert(0, options.prompt or "")
        self.prompt.grid(row=0, column=0, sticky="ew")
        self.prompt.bind("<Return>", lambda _event: self.start())
        self.button = ttk.Button(frame, text="Generate", command=self.start)
        self.button.grid(row=0, column=1, sticky="ew")
        self.stop_button = ttk.Button(frame, text="Stop", command=self.request_stop)
        self.stop_button.grid(row=0, column=2, sticky="ew")
        self.stop_button.state(["disabled"])
        self.negative_prompt = ttk.Entry(frame, width=60)
        self.negative_prompt.insert(0, options.negative_prompt or "")
        self.negative_prompt.grid(row=1, column=0, sticky="ew", pady=(4, 0))
        ttk.Label(frame, text="negative prompt").grid(row=1, column=1, columnspan=2, sticky="w")

    def _build_settings(self, frame) -> None:
        """One labelled entry per :data:`SETTINGS` row, filled from the options, and the scheduler's list."""
        from tkinter import ttk

        from sd_utils.generation.schedulers import SAMPLERS

        row = ttk.Frame(frame)
        row.grid(row=2, column=0, columnspan=COLUMNS, sticky="w", pady=4)
        width, height = self.options.image_size_for(self.job.model.spec.default_image_size)
        initial = {**dataclasses.asdict(self.options), "width": width, "height": height}
        initial["seed"] = RANDOM_SEED if initial["seed"] is None else initial["seed"]
        self.settings: dict[str, Any] = {}
        for column, setting in enumerate(SETTINGS):
            ttk.Label(row, text=setting.label).grid(row=0, column=2 * column, padx=(6, 2))
            entry = ttk.Entry(row, width=setting.width)
            entry.insert(0, str(initial[setting.option]))
            entry.grid(row=0, column=2 * column + 1)
            self.settings[setting.option] = entry
        ttk.Label(row, text="Scheduler").grid(row=0, column=2 * len(SETTINGS), padx=(6, 2))
        self.scheduler = ttk.Combobox(row, values=[MODEL_SCHEDULER, *SAMPLERS], width=20, state="readonly")
        self.scheduler.set(self.options.scheduler or MODEL_SCHEDULER)
        self.scheduler.grid(row=0, column=2 * len(SETTINGS) + 1)

    def read_options(self) -> Options:
        """The options of the next run: the command line's, with what the window's controls say now."""
        changes: dict[str, Any] = {
            "prompt": self.prompt.get().strip(),
            "negative_prompt": self.negative_prompt.get().strip() or None,
            "scheduler": _scheduler(self.scheduler.get()),
        }
        if not self.options.fuse_loras:
            changes["lora"] = self.lora_list.selected()
        if self.control is not None:
            changes.update(self.control.changes())
        for setting in SETTINGS:
            text = self.settings[setting.option].get()
            try:
                changes[setting.option] = setting.parse(text)
            except ValueError:
                raise UserInputError(f"{setting.label} {text!r} is not a number") from None
        if not 1 <= changes["num_images"] <= MAX_IMAGES:
            raise UserInputError(f"Images {changes['num_images']}: the window shows 1 to {MAX_IMAGES}")
        options = dataclasses.replace(self.options, image_size=None, **changes)
        check_options(options)
        return options

    def _ready_text(self) -> str:
        clamped = " (the window shows at most 9)" if self.options.num_images == MAX_IMAGES else ""
        return f"Ready: {self.options.num_images} image(s) per run{clamped}. Type a prompt and press Enter."

    @property
    def running(self) -> bool:
        return self.worker is not None and self.worker.is_alive()

    def start(self) -> None:
        """Start a run with the prompt in the box (main thread)."""
        if self.running or self.closing:
            return
        if not self.prompt.get().strip():
            self.status.configure(text="Type a prompt first.")
            return
        try:
            request = generation_request(self.read_options(), self.job.model)
        except SdxlOliveError as error:
            self.status.configure(text=f"Error: {error}")
            return
        self.stop.clear()
        self.last_request = request
        self.button.state(["disabled"])
        self.stop_button.state(["!disabled"])
        self.progress.configure(maximum=request.num_calls * request.steps_per_call, value=0)
        for cell in self.cells:
            cell.configure(image="")
        self.thumbnails.clear()
        self.status.configure(text=f"Generating {request.num_images} image(s), seed {request.seed}…")
        self.worker = threading.Thread(target=self._work, args=(request,), name="generation")
        self.worker.start()

    def _work(self, request: GenerationRequest) -> None:
        """Worker thread: runs the generation; talks to the main thread only through ``self.events``."""
        try:
            images = self.generate_function(
                request,
                on_step=lambda done, total: self.events.put(("step", (done, total))),
                on_image=lambda image: self.events.put(("image", image)),
                should_stop=self.stop.is_set,
            )
            self.events.put(("stopped" if self.stop.is_set() else "done", len(images)))
        except SdxlOliveError as error:  # says what to change, e.g. out of GPU memory: lower the size
            self.events.put(("error", str(error)))
        except Exception as error:
            logger.exception("generation failed")
            self.events.put(("error", f"{type(error).__name__}: {error}"))

    def _poll(self) -> None:
        """Main thread: apply the worker's events to the widgets, then poll again."""
        while True:
            try:
                kind, payload = self.events.get_nowait()
            except queue.Empty:
                break
            self._apply(kind, payload)
        if self.closing and not self.running:
            self.root.destroy()
            return
        self.root.after(POLL_MS, self._poll)

    def _apply(self, kind: str, payload: Any) -> None:
        if kind == "step":
            done, total = payload
            self.progress.configure(maximum=total, value=done)
        elif kind == "image":
            self._show(payload)
        elif kind in ("done", "stopped"):
            said = "Done" if kind == "done" else "Stopped"
            seed = self.last_request.seed
            self.status.configure(
                text=f"{said}: {payload} image(s) saved in {self.options.output_dir} (seed {seed}, image i: seed + i)."
            )
            self._idle()
        elif kind == "error":
            self.status.configure(text=f"Error: {payload}")
            self._idle()

    def _idle(self) -> None:
        self.button.state(["!disabled"])
        self.stop_button.state(["disabled"])

    def request_stop(self) -> None:
        """Stop button: the run ends after its current denoising step (that call's images are not saved)."""
        if self.running:
            self.stop.set()
            self.status.configure(text="Stopping after this step…")

    def _show(self, image: GeneratedImage) -> None:
        from PIL import Image, ImageTk

        with Image.open(image.path) as picture:
            picture.thumbnail((THUMBNAIL, THUMBNAIL))
            thumbnail = ImageTk.PhotoImage(picture, master=self.root)
        self.thumbnails.append(thumbnail)
        cell = self.cells[image.index % MAX_IMAGES]
        cell.configure(image=thumbnail)
        cell.image_path = image.path

    def close(self) -> None:
        """Window closed: stop the run after its current step, then destroy the window (from :meth:`_poll`)."""
        self.closing = True
        self.stop.set()
        if not self.running:
            self.root.destroy()


def run_window(options: Options, job: Job, ready: ReadyModels) -> int:
    """Open the window and run Tk's main loop until it is closed."""
    import tkinter

    try:
        root = tkinter.Tk()
    except tkinter.TclError as error:
        raise SdxlOliveError(f"--interactive needs a display ({error}); run without it, or set DISPLAY") from None
    GenerationWindow(root, options=options, job=job, generate=Generator(options, job, ready).generate)
    root.mainloop()
    return 0
