"""The builds a first run makes one after another, each in a process of its own at once: the model's build, the extra
UNet graphs a run asks for (``optimize/unet_graphs.py``: the UNet with ControlNet residuals, DeepCache's two graphs)
and any other job. On a many-core GPU machine the fusions overlap: the lent session's time goes to measuring.

Each extra UNet graph is built in a folder of its own (its own Olive cache too) and moved into the model's build when
all are done: the model's build places its folder whole.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path


def build_in_parallel(args, graphs: tuple[str, ...], *jobs: tuple[Callable, tuple]) -> None:
    """The build of ``args.model_id`` for ``args.provider`` in ``args.models_dir`` (Olive cache ``args.cache_dir``),
    its UNet graphs ``graphs`` and ``jobs`` ((function, arguments) run in a process each)."""
    from sd_utils.optimize.recipe import BuildRecipe
    from sd_utils.sources.models import resolve_model

    model = resolve_model(args.model_id, models_dir=Path(args.models_dir))  # made once, before the processes read it
    paths = BuildRecipe.of(model, provider=args.provider).paths(Path(args.models_dir))
    started = time.perf_counter()
    spawn = multiprocessing.get_context("spawn")
    asides = {graph: Path(args.models_dir) / f"{graph}-aside" for graph in graphs}
    workers = [spawn.Process(target=_build_model, args=(args.model_id, args.provider, args.models_dir, args.cache_dir))]
    for graph, aside in asides.items():
        aside.mkdir(parents=True, exist_ok=True)
        worker_args = (args.model_id, args.provider, args.models_dir, graph, aside)
        workers.append(spawn.Process(target=_build_graph, args=worker_args))
    workers += [spawn.Process(target=function, args=arguments) for function, arguments in jobs]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
        assert worker.exitcode == 0, f"a build failed ({worker.exitcode})"
    for graph, aside in asides.items():
        if not (paths.optimized / graph).exists():  # a rename: the model's build must be there, not made anew
            (aside / "build" / graph).rename(paths.optimized / graph)
    print(json.dumps({"parallel_builds_s": round(time.perf_counter() - started, 1), "graphs": graphs}), flush=True)


def _build_model(model_id: str, provider: str, models_dir: str, cache_dir: str) -> None:
    from stable_diffusion_xl import main

    argv = ["--optimize", "--model_id", model_id, "--provider", provider, "--models_dir", models_dir]
    assert main([*argv, "--cache_dir", cache_dir]) == 0


def _build_graph(model_id: str, provider: str, models_dir: str, graph: str, aside: Path) -> None:
    from sd_utils.optimize.recipe import BuildPaths
    from sd_utils.optimize.unet_graphs import unet_graph
    from sd_utils.runtime.providers import PROVIDERS
    from sd_utils.sources.models import resolve_model

    model = resolve_model(model_id, models_dir=Path(models_dir))
    paths = BuildPaths(optimized=aside / "build", unoptimized=aside / "unoptimized")
    paths.optimized.mkdir(exist_ok=True)
    unet_graph(paths, model, PROVIDERS[provider], graph, flag="bench", cache_dir=aside / "cache", tempdir=None)
