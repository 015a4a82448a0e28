"""A prompts file run as one job: every row a request, images named by row key, a manifest line per image, resume.

The same work items run in this process (:func:`run_local`) or on Ray actors (``jobs/ray_job.py``).
"""

from __future__ import annotations

import logging
import time

from sd_utils.app import Generator, Job, build_recipe
from sd_utils.errors import DiskFullError
from sd_utils.files import exclusive
from sd_utils.generation.request import GeneratedImage
from sd_utils.jobs.manifest import JOB_LOCK, JobFolder
from sd_utils.jobs.prompts_file import read_prompts_file
from sd_utils.jobs.rows import RowWork, manifest_entry, row_requests, run_row
from sd_utils.options import Options

logger = logging.getLogger(__name__)


def run_local(options: Options, job, ready, works: list[RowWork], folder: JobFolder, *, identity: dict) -> int:
    """The job in this process, row by row; progress as images done / total and images per second."""
    from tqdm import tqdm

    generator = Generator(options, job, ready)
    total = sum(work.pending for work in works)
    made = [0]  # tqdm counts nothing when it is off (no terminal)
    with tqdm(total=total, unit="image", desc="images", disable=None) as progress:
        for work in (work for work in works if work.pending):
            last = [time.perf_counter()]

            def on_image(image: GeneratedImage, work=work, last=last) -> None:
                now = time.perf_counter()
                folder.record(manifest_entry(work, image, seconds=round(now - last[0], 3), **identity))
                last[0] = now
                made[0] += 1
                progress.update(1)

            try:
                run_row(generator.generate, work, options.output_dir, on_image=on_image)
            except DiskFullError:
                all_images = sum(each.request.num_images for each in works)
                raise DiskFullError(
                    f"the disk of {options.output_dir} is full: this run saved {made[0]} of the job's {total} missing "
                    f"image(s) there ({all_images - total + made[0]} of its {all_images} are done); free some space "
                    "and run the same command again to finish the job"
                ) from None
    return total


def list_existing(works: list[RowWork], folder: JobFolder, *, identity: dict[str, str]) -> None:
    """Manifest lines for images made by an earlier run whose line a kill lost (the file is there, the line is not)."""
    for work in works:
        for index, name in folder.files.get(work.key, {}).items():
            image = GeneratedImage(path=folder.folder / name, seed=folder.images[(work.key, index)], index=index)
            folder.record(manifest_entry(work, image, seconds=None, **identity))


def plan_rows(options: Options, job: Job) -> list[RowWork]:
    """Every row of ``--prompts_file`` as a request, all checked before anything is built; the images already in
    --output_dir are skipped."""
    rows = read_prompts_file(options.prompts_file)
    recipe, _ = build_recipe(options, job.model, job.provider)
    return row_requests(options, job.model, rows, JobFolder(options.output_dir), build=recipe.digest)


def run_job(options: Options, job: Job, ready, works: list[RowWork]) -> tuple[int, int]:
    """The planned rows: the images missing in --output_dir, locally or on Ray; (made, already there).

    One job at a time writes into a folder: a second run of it waits, then makes only what the first left."""
    options.output_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(options.output_dir / JOB_LOCK, waiting_for=f"writing into --output_dir {options.output_dir}"):
        folder = JobFolder(options.output_dir)
        works = [work.against(folder) for work in works]
        identity = {"model": job.model.model_id, "build": ready.model.optimized.name, "provider": job.provider.name}
        list_existing(works, folder, identity=identity)
        already = sum(work.request.num_images - work.pending for work in works)
        if options.ray:
            from sd_utils.jobs.ray_job import run_on_ray

            return run_on_ray(options, job, ready, works, folder, identity=identity), already
        return run_local(options, job, ready, works, folder, identity=identity), already
