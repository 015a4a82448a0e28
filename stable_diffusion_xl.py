"""sdxl-olive: optimize Stable Diffusion XL with Olive and generate images with ONNX Runtime.

    python stable_diffusion_xl.py --model_id tiny --prompt "a red circle"      # offline demo
    python stable_diffusion_xl.py --optimize --provider dml                     # SDXL base for DirectML
    python stable_diffusion_xl.py --help

This file only parses, validates and dispatches; the work lives in ``sd_utils/``.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Mapping

# Olive's telemetry tries to reach its server at exit (~10 s when offline); users can opt back in.
os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")
if os.environ["OLIVE_DISABLE_TELEMETRY"] == "1":
    # Olive 0.13 queues a heartbeat before it reads OLIVE_DISABLE_TELEMETRY, and its OpenTelemetry exporter still
    # waits ~10 s at exit to send it; OpenTelemetry's own switch makes that logger a no-op.
    os.environ.setdefault("OTEL_SDK_DISABLED", "true")

from sd_utils.errors import SdxlOliveError
from sd_utils.options import Options, parse_options
from sd_utils.runtime.providers import PROVIDERS, Provider

logger = logging.getLogger("sdxl_olive")


def configure_logging(*, debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(message)s")
    for name in ("sd_utils", "sdxl_olive"):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.INFO)
    # optimum-onnx installs into optimum's namespace, which diffusers reports at import as "Multiple distributions
    # found for package optimum" (a warning with nothing to act on)
    logging.getLogger("diffusers.utils.import_utils").setLevel(logging.ERROR)


def manage_builds(options: Options) -> int:
    """``--list_builds`` / ``--delete_build NAME``."""
    from sd_utils.optimize.builds import delete_build, human_size, list_builds

    if options.delete_build:
        build = delete_build(options.models_dir, options.delete_build)
        print(f"Deleted {build.name} ({human_size(build.size)} freed)")
        return 0
    builds = list_builds(options.models_dir)
    for build in builds:
        print(f"{build.name}  {human_size(build.size):>9}  {build.made_from}")
    total = human_size(sum(build.size for build in builds))
    print(f"{len(builds)} build(s) in {options.models_dir / 'optimized'}, {total} in all")
    return 0


def run(options: Options, *, provider_table: Mapping[str, Provider] | None = None) -> int:
    from sd_utils import app

    if options.list_builds or options.delete_build:
        return manage_builds(options)

    if options.ray:  # a missing install must never cost a model build
        from sd_utils.jobs.ray_job import check_ray_installed

        check_ray_installed(options.ray, serve=options.serve)
    job = app.plan(options, provider_table=provider_table or PROVIDERS)
    works = None
    if options.prompts_file:
        from sd_utils.jobs.run import plan_rows

        works = plan_rows(options, job)  # every row checked before anything is built
    ready = app.prepare_models(options, job)
    if options.optimize:
        for paths in filter(None, (ready.model, ready.refiner)):
            print(f"Optimized model: {paths.optimized}")
            print(f"Unoptimized model: {paths.unoptimized}")
    if options.serve and options.ray:
        from sd_utils.serve.ray_serve import serve_on_ray

        return serve_on_ray(options, job, ready)
    if options.serve:
        from sd_utils.serve.server import serve

        return serve(options, job, ready)
    if options.interactive:
        from sd_utils.ui.gui import run_window

        return run_window(options, job, ready)
    if works is not None:
        from sd_utils.jobs.run import run_job

        made, skipped = run_job(options, job, ready, works)
        manifest = options.output_dir / "manifest.jsonl"
        print(f"Job done: {made} image(s) made, {skipped} already there; manifest: {manifest}")
        return 0
    if options.generates:
        for image in app.generate(options, job, ready):
            print(f"Generated {image.path}")
    return 0


def main(argv: list[str] | None = None, *, provider_table: Mapping[str, Provider] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the process exit code.

    ``provider_table``: the execution-provider rows ``--provider`` picks from, for benchmarks and tests that tune
    them (default: :data:`sd_utils.runtime.providers.PROVIDERS`)."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        configure_logging(debug=debug)  # before parsing: --from_png reports what it read
        options = parse_options(argv)
        return run(options, provider_table=provider_table)
    except SdxlOliveError as error:
        if debug:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except SystemExit as exit_request:  # --help
        return int(exit_request.code or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if debug:
            raise
        text = " ".join(str(error).split())  # ONNX Runtime's messages end in a newline: keep to one line
        print(
            f"error: unexpected {type(error).__name__}: {text} (rerun with --debug for the traceback)", file=sys.stderr
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
