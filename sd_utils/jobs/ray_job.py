"""``--ray``: the job's images as a Ray Dataset, made by a pool of actors that each load the optimized pipeline once.

The driver has built the models (and found what is already done) before any actor starts. One dataset row per
missing image; ``map_batches`` hands an actor up to ``--batch_size`` of them, the actor makes them with the same
code as a local run and writes each PNG atomically under its job name, and the driver appends the manifest lines as
results stream back. An actor killed mid-batch is restarted by Ray and the batch retried (Ray Data's default for
actor pools); images the killed attempt had finished are found on disk and not made again.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from sd_utils.errors import SetupError, UserInputError
from sd_utils.generation.request import GeneratedImage

logger = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parents[2]
INSTALL = "pip install 'ray[data]==2.60.0'"
SERVE_INSTALL = "pip install 'ray[serve]==2.60.0'"
CLIENT_INSTALL = "pip install 'ray[data,client]==2.60.0'"
# what an actor returns per image it made (or found made by a killed attempt: seconds None)
RESULT_COLUMNS = ("row_index", "image_index", "file", "seed", "seconds")


class ImageActor:
    """One Ray actor: the pipeline loaded once, then batches of (row, image index) made into PNGs."""

    def __init__(self, options, job, ready, works):
        from sd_utils.app import Generator

        self.options, self.works = options, works
        self.generator = Generator(options, job, ready)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from sd_utils.jobs.manifest import JobFolder

        folder = JobFolder(self.options.output_dir)  # what a killed attempt of this batch already wrote
        made: dict[str, list] = {column: [] for column in RESULT_COLUMNS}
        wanted: dict[int, list[int]] = {}
        for row_index, image_index in zip(batch["row_index"], batch["image_index"], strict=True):
            wanted.setdefault(int(row_index), []).append(int(image_index))
        for row_index, indices in wanted.items():
            self._make_row(row_index, indices, folder, made)
        return made

    def _make_row(self, row_index: int, indices: list[int], folder, made: dict[str, list]) -> None:
        import dataclasses

        from sd_utils.jobs.rows import run_row

        def add(index: int, name: str, seed: int, seconds: float | None) -> None:
            for column, value in zip(RESULT_COLUMNS, (row_index, index, name, seed, seconds), strict=True):
                made[column].append(value)

        work = self.works[row_index]
        missing = tuple(index for index in indices if not folder.complete(work.key, index))
        for index in (index for index in indices if index not in missing):  # done by a killed attempt
            seed = folder.images[(work.key, index)]
            add(index, folder.files[work.key][index], seed, None)
        if not missing:
            return
        started = [time.perf_counter()]

        def on_image(image: GeneratedImage) -> None:
            add(image.index, image.path.name, image.seed, time.perf_counter() - started[0])
            started[0] = time.perf_counter()

        work = dataclasses.replace(work, request=dataclasses.replace(work.request, image_indices=missing))
        run_row(self.generator.generate, work, self.options.output_dir, on_image=on_image)


def check_ray_installed(address: str, *, serve: bool = False) -> None:
    """Raise :class:`SetupError` with the install command when Ray (with ``serve``: Ray Serve's extras) is missing,
    or Ray Client's gRPC for a ``ray://`` address (found without importing them: slow)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise SetupError(f"--ray needs Ray, which is not installed: {SERVE_INSTALL if serve else INSTALL}")
    if serve and importlib.util.find_spec("watchfiles") is None:  # one of what ray[serve] adds to Ray
        raise SetupError(f"--serve --ray needs Ray Serve, which is not installed: {SERVE_INSTALL} (docs/serve.md)")
    if address.startswith("ray://") and importlib.util.find_spec("grpc") is None:
        raise SetupError(
            f"--ray {address} connects through Ray Client, which is not installed: {CLIENT_INSTALL} (see docs/batch.md)"
        )


def actor_resources(provider, workers: int) -> dict[str, Any]:
    """Ray resources of one actor or replica: a GPU each for GPU providers; on the CPU provider one core, and a thread
    share in each ONNX Runtime session (``workers`` processes each running ORT's one thread per core would
    oversubscribe the machine several times over)."""
    from sd_utils.runtime.providers import THREADS_VARIABLE

    if provider.olive_device == "gpu":
        return {"num_gpus": 1, "num_cpus": 1}
    threads = os.environ.get(THREADS_VARIABLE) or str(max(1, (os.cpu_count() or 1) // workers))
    return {"num_gpus": 0, "num_cpus": 1, "runtime_env": {"env_vars": {THREADS_VARIABLE: threads}}}


def default_workers(provider) -> int:
    """One actor per GPU of the cluster for GPU providers, one for the CPU provider."""
    import ray

    return max(1, int(ray.cluster_resources().get("GPU", 0))) if provider.olive_device == "gpu" else 1


def check_reachable(address: str) -> None:
    """A ``host:port`` or ``ray://host:port`` that answers (Ray itself waits minutes on one that does not)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto": Ray finds the local cluster or says it has none
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise UserInputError(
            f"--ray {address}: no Ray cluster there ({error.strerror or error}); start one with 'ray start --head', "
            "or give --ray alone for a local runtime"
        ) from None


def start_ray(address: str | None) -> None:
    """Join the Ray cluster at ``address`` (None: start a local runtime in this process) with this project on the
    workers' path."""
    import ray
    import ray.data

    # the tool shows its own progress (images done / total, images per second); Ray's would interleave with it
    ray.data.DataContext.get_current().enable_progress_bars = False
    # one line per stage, nothing alarming when all is well: Ray's note that its local runtime uses token
    # authentication (it does, and should), Ray Data's per-dataset INFO lines and its "progress bars disabled" warning
    for name in ("ray._private.authentication.authentication_token_setup", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # actors import this project: give them its folder (on a cluster, the same checkout path on every node)
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, (str(PROJECT_DIR), os.environ.get("PYTHONPATH"))))}}
    try:
        ray.init(
            address=address,
            runtime_env=env,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    except ConnectionError as error:
        raise UserInputError(
            f"--ray {address}: no Ray cluster there ({error}); start one with 'ray start --head', or give --ray alone "
            "for a local runtime"
        ) from None


def run_on_ray(options, job, ready, works, folder, *, identity: dict[str, str]) -> int:
    """Make the job's missing images on Ray; returns how many were made."""
    import ray  # installed: the CLI called check_ray_installed before anything was built

    items = [
        {"row_index": row_index, "image_index": index}
        for row_index, work in enumerate(works)
        for index in work.request.indices
    ]
    if not items:
        return 0
    address = None if options.ray == "local" else options.ray
    if address is not None:
        check_reachable(address)
    start_ray(address)
    try:
        return _run_dataset(ray, options, job, ready, works, folder, items=items, identity=identity)
    finally:
        ray.shutdown()  # a local runtime stops; on a cluster this driver disconnects


def _run_dataset(ray, options, job, ready, works, folder, *, items: list[dict], identity: dict[str, str]) -> int:
    """The missing images through ``map_batches`` over the actor pool; the manifest written as results arrive."""
    from tqdm import tqdm

    from sd_utils.jobs.rows import manifest_entry

    workers = options.workers or default_workers(job.provider)
    logger.info("running %d image(s) on Ray with %d actor(s)", len(items), workers)
    dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items) // max(1, options.batch_size)))
    results = dataset.map_batches(
        ImageActor,
        fn_constructor_kwargs={"options": options, "job": job, "ready": ready, "works": works},
        batch_size=options.batch_size,
        compute=ray.data.ActorPoolStrategy(size=workers),
        **actor_resources(job.provider, workers),
    )
    made = 0
    with tqdm(total=len(items), unit="image", desc="images", disable=None) as progress:
        for result in results.iter_rows():
            work = works[int(result["row_index"])]
            image = GeneratedImage(
                path=options.output_dir / result["file"], seed=int(result["seed"]), index=int(result["image_index"])
            )
            if not image.path.is_file():  # on a cluster without a shared --output_dir
                raise UserInputError(
                    f"a Ray actor wrote {image.path.name} where this machine cannot see it: put --output_dir (and "
                    "--models_dir) on a filesystem every node shares; run again to finish the job"
                )
            seconds = None if result["seconds"] is None else round(float(result["seconds"]), 3)
            folder.record(manifest_entry(work, image, seconds=seconds, **identity))
            made += 1
            progress.update(1)
    return made
