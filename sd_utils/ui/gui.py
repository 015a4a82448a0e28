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
from sd_utils.errors import SdxlOliveError
from sd_utils.generation.request import GeneratedImage, GenerationRequest
from sd_utils.options import Options

logger = logging.getLogger(__name__)

MAX_IMAGES = 9
COLUMNS = 3
THUMBNAIL = 256
POLL_MS = 50

# what the worker thread may send: ("step", (done, total)), ("image", GeneratedImage), ("done", count),
# ("error", message)
Event = tuple[str, Any]
GenerateFunction = Callable[..., list[GeneratedImage]]  # (request, on_step=, on_image=, should_stop=)


class GenerationWindow:
    """Prompt box, Generate button, progress bar over all steps of a run, and a grid of up to 9 images."""

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
        self.closing = False
        self.thumbnails: list[Any] = []  # PhotoImages must stay referenced while shown

        root.title(f"sdxl-olive — {job.model.model_id} ({job.provider.name})")
        frame = ttk.Frame(root, padding=8)
        frame.grid(sticky="nsew")
        self.prompt = ttk.Entry(frame, width=60)
        self.prompt.insert(0, options.prompt or "")
        self.prompt.grid(row=0, column=0, columnspan=COLUMNS - 1, sticky="ew")
        self.prompt.bind("<Return>", lambda _event: self.start())
        self.button = ttk.Button(frame, text="Generate", command=self.start)
        self.button.grid(row=0, column=COLUMNS - 1, sticky="ew")
        self.progress = ttk.Progressbar(frame, mode="determinate", maximum=1)
        self.progress.grid(row=1, column=0, columnspan=COLUMNS, sticky="ew", pady=4)
        self.status = ttk.Label(frame, text=self._ready_text())
        self.status.grid(row=2, column=0, columnspan=COLUMNS, sticky="w")
        grid = ttk.Frame(frame)
        grid.grid(row=3, column=0, columnspan=COLUMNS, sticky="w")
        self.cells = [ttk.Label(grid) for _ in range(self.options.num_images)]
        for index, cell in enumerate(self.cells):
            cell.grid(row=index // COLUMNS, column=index % COLUMNS, padx=2, pady=2)
        root.protocol("WM_DELETE_WINDOW", self.close)
        self.prompt.focus_set()
        root.after(POLL_MS, self._poll)

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
        text = self.prompt.get().strip()
        if not text:
            self.status.configure(text="Type a prompt first.")
            return
        try:
            request = generation_request(dataclasses.replace(self.options, prompt=text), self.job.model)
        except SdxlOliveError as error:
            self.status.configure(text=f"Error: {error}")
            return
        self.button.state(["disabled"])
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
            self.events.put(("done", len(images)))
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
        elif kind == "done":
            self.status.configure(text=f"Done: {payload} image(s) saved in {self.options.output_dir}.")
            self.button.state(["!disabled"])
        elif kind == "error":
            self.status.configure(text=f"Error: {payload}")
            self.button.state(["!disabled"])

    def _show(self, image: GeneratedImage) -> None:
        from PIL import Image, ImageTk

        with Image.open(image.path) as picture:
            picture.thumbnail((THUMBNAIL, THUMBNAIL))
            thumbnail = ImageTk.PhotoImage(picture, master=self.root)
        self.thumbnails.append(thumbnail)
        cell = self.cells[image.index % len(self.cells)]
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
