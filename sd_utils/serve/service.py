"""What the HTTP API does, without HTTP: one loaded model serving A1111-style requests one at a time, in the order
they came, with progress, interrupt and model switching. The same object runs under uvicorn and in each Ray Serve
replica; the window and the CLI share its generation code (``app.Generator``)."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sd_utils import app
from sd_utils.errors import UserInputError
from sd_utils.generation.lora_tags import lora_names
from sd_utils.generation.output import save_png
from sd_utils.optimize.recipe import read_record
from sd_utils.options import Options
from sd_utils.serve import a1111

logger = logging.getLogger(__name__)


class Turns:
    """A first-come, first-served lock: each request waits for those that came before it (``threading.Lock``
    promises no order)."""

    def __init__(self):
        self._condition = threading.Condition()
        self._next = 0
        self._serving = 0

    @contextlib.contextmanager
    def turn(self):
        with self._condition:
            ticket = self._next
            self._next += 1
            self._condition.wait_for(lambda: self._serving == ticket)
        try:
            yield
        finally:
            with self._condition:
                self._serving += 1
                self._condition.notify_all()

    @property
    def count(self) -> int:
        """Requests running or waiting."""
        with self._condition:
            return self._next - self._serving


@dataclasses.dataclass
class Progress:
    """The running request's denoising progress (``/progress``) and its stop flag (``/interrupt``)."""

    started: float = 0.0
    done: int = 0
    total: int = 0
    interrupted: bool = False
    timestamp: str = ""
    running: bool = False

    def begin(self) -> None:
        self.started, self.done, self.total, self.interrupted = time.perf_counter(), 0, 0, False
        self.timestamp, self.running = time.strftime("%Y%m%d%H%M%S"), True

    def step(self, done: int, total: int) -> None:
        self.done, self.total = done, total

    def stop_requested(self) -> bool:
        return self.interrupted

    def end(self) -> None:
        self.running, self.done, self.total = False, 0, 0


def model_title(options: Options, job: app.Job, ready: app.ReadyModels) -> tuple[str, str | None]:
    """(A1111's checkpoint title ``name [hash]``, the hash): a single file's short SHA-256, else the build's digest."""
    model = job.model
    name = Path(options.model_id).stem if Path(options.model_id).exists() else options.model_id
    digest = model.checkpoint.short_hash if model.checkpoint is not None else None
    digest = digest or (read_record(ready.model.optimized).get("digest") or "")[:10] or None
    return (f"{name} [{digest}]" if digest else name), digest


class GenerationService:
    """The server's model, loaded once (``app.Generator``), and the requests' queue. ``models``: the ``--model_id``
    values a client may switch to with ``/options`` (the served one first)."""

    def __init__(self, options: Options, job: app.Job, ready: app.ReadyModels, *, models: tuple[str, ...] = ()):
        self.models = tuple(dict.fromkeys((options.model_id, *models)))
        self.turns = Turns()
        self.progress = Progress()
        self._load(options, job, ready)

    def _load(self, options: Options, job: app.Job, ready: app.ReadyModels) -> None:
        self.options, self.job, self.ready = options, job, ready
        self.generator = app.Generator(options, job, ready)
        self.title, self.hash = model_title(options, job, ready)
        # the ControlNets requests may use (built at start): their names -> the --controlnet values
        sources = app.controlnet_sources(options, job.model)
        self.controlnets = {source.name: given for source, (given, _) in zip(sources, options.controlnet, strict=True)}

    # --- generation ---------------------------------------------------------------------------------------------

    def generate(self, payload: dict[str, Any], mode: str) -> dict[str, Any]:
        """A ``txt2img`` or ``img2img`` request -> A1111's response (``images``, ``parameters``, ``info``)."""
        with tempfile.TemporaryDirectory(prefix="sdxl-olive-api-") as scratch:
            read = a1111.read_request(
                payload, self.options, mode=mode, scratch=Path(scratch), controlnets=self.controlnets
            )
            self._check_overrides(payload)
            with self.turns.turn():
                request = app.generation_request(read.options, self.job.model)
                made: list[tuple[int, int, Any, dict[str, str]]] = []

                def keep(image, folder: Path, index: int, seed: int, metadata: dict[str, str]) -> Path:
                    made.append((index, seed, image, metadata))
                    if read.save_images:  # named as the CLI names its files
                        return save_png(image, folder, seed=seed, metadata=metadata)
                    return folder / f"{index:05d}-{seed}.png"  # not written

                self.progress.begin()
                try:
                    self.generator.generate(
                        request,
                        on_step=self.progress.step,
                        should_stop=self.progress.stop_requested,
                        saver=keep,
                    )
                finally:
                    self.progress.end()
        made.sort(key=lambda item: item[0])
        images = [a1111.encode_png(image, metadata) for _, _, image, metadata in made] if read.send_images else []
        if read.include_init_images:
            images += [a1111.encode_png(image) for image in read.init_images]
        seeds = [seed for _, seed, _, _ in made]
        info = a1111.info_json(
            dataclasses.replace(read.options, seed=request.seed),
            [metadata for _, _, _, metadata in made],
            seeds,
            model=self.title.split(" [")[0],
            model_hash=self.hash,
        )
        return {"images": images, "parameters": read.payload, "info": info}

    def _check_overrides(self, payload: dict[str, Any]) -> None:
        """``override_settings``: only the served model's own settings (A1111 clients send the checkpoint)."""
        for key, value in (payload.get("override_settings") or {}).items():
            if key == "sd_model_checkpoint" and self._model_of(value) == self.options.model_id:
                continue
            current = self.settings().get(key)
            if value != current:
                raise UserInputError(
                    f"override_settings.{key}={value!r}: this server runs with {current!r}"
                    + ("; switch models with POST /sdapi/v1/options first" if key == "sd_model_checkpoint" else "")
                )

    def interrupt(self) -> None:
        if self.progress.running:
            self.progress.interrupted = True

    def progress_view(self) -> dict[str, Any]:
        """A1111's ``/progress``: the running request's fraction done and ETA, and how many requests there are."""
        progress = self.progress
        fraction = progress.done / progress.total if progress.running and progress.total else 0.0
        elapsed = time.perf_counter() - progress.started
        eta = elapsed / fraction - elapsed if fraction > 0 else (0.0 if not progress.running else None)
        count = self.turns.count
        return {
            "progress": fraction,
            "eta_relative": eta,
            "state": {
                "skipped": False,
                "interrupted": progress.interrupted,
                "stopping_generation": False,
                "job": "txt2img/img2img" if progress.running else "",
                "job_count": count,
                "job_timestamp": progress.timestamp,
                "job_no": 0,
                "sampling_step": progress.done,
                "sampling_steps": progress.total,
            },
            "queue": max(0, count - (1 if progress.running else 0)),  # ours: requests waiting behind the running one
            "current_image": None,
            "textinfo": None,
        }

    # --- models and settings ------------------------------------------------------------------------------------

    def sd_models(self) -> list[dict[str, Any]]:
        rows = []
        for model_id in self.models:
            title = self.title if model_id == self.options.model_id else model_id
            rows.append(
                {
                    "title": title,
                    "model_name": title.split(" [")[0],
                    "hash": self.hash if model_id == self.options.model_id else None,
                    "sha256": None,
                    "filename": model_id,
                    "config": None,
                }
            )
        return rows

    def settings(self) -> dict[str, Any]:
        """A1111's ``/options``: the settings its clients read."""
        return {
            "sd_model_checkpoint": self.title,
            "sd_checkpoint_hash": self.hash,
            "sd_vae": "Automatic",
            "CLIP_stop_at_last_layers": 1,
            "samples_format": "png",
            "samples_save": True,
            "outdir_samples": "",
            "enable_pnginfo": True,
        }

    def _model_of(self, given: Any) -> str | None:
        """The ``--model_id`` of an ``sd_model_checkpoint`` value (a title, a model name or the id itself)."""
        for row, model_id in zip(self.sd_models(), self.models, strict=True):
            if given in (row["title"], row["model_name"], model_id) or str(given).lower() == row["title"].lower():
                return model_id
        return None

    def set_settings(self, values: dict[str, Any]) -> None:
        """``POST /options``: a model switch by ``sd_model_checkpoint``; the other settings only at their values."""
        for key, value in values.items():
            if key == "sd_model_checkpoint":
                continue
            if key not in self.settings() or self.settings()[key] != value:
                raise UserInputError(f"{key}={value!r}: this server cannot change that setting; leave it out")
        if "sd_model_checkpoint" not in values:
            return
        model_id = self._model_of(values["sd_model_checkpoint"])
        if model_id is None:
            names = ", ".join(row["title"] for row in self.sd_models())
            raise UserInputError(f"sd_model_checkpoint={values['sd_model_checkpoint']!r}: not a model here ({names})")
        if model_id != self.options.model_id:
            with self.turns.turn():
                self._switch(model_id)

    def _switch(self, model_id: str) -> None:
        """Serve ``model_id`` instead (built first when it has no build yet)."""
        logger.info("switching the served model to %s", model_id)
        options = dataclasses.replace(self.options, model_id=model_id)
        job = app.plan(options, provider_table={self.job.provider.name: self.job.provider})
        ready = app.prepare_models(options, job)
        self.generator = None  # the old sessions go before the new ones come (optimum's parts refer to each other)
        gc.collect()
        self._load(options, job, ready)

    def loras(self) -> list[dict[str, Any]]:
        return [
            {"name": name, "alias": name, "path": str(path), "metadata": {}}
            for name, path in lora_names(self.options.lora_dir).items()
        ]
