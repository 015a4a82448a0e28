"""``--serve --ray [ADDRESS] --workers N``: the same API app on Ray Serve, one replica per GPU (or N CPU replicas),
requests spread over them by Serve's router.

Each replica is a Ray actor that loads the pipeline once (a :class:`GenerationService`, with its own queue: a replica
makes one image batch at a time). The driver has built the models before any replica starts. Ray Serve restarts a
replica that dies; a request it was running is answered with an error by Serve's proxy, not left hanging.
``/progress`` and ``/interrupt`` reach whichever replica the router picks.
"""

from __future__ import annotations

import logging
import time

from sd_utils.errors import SetupError
from sd_utils.options import parse_credentials

logger = logging.getLogger(__name__)

# this replica's service (each replica is a process of its own); set by the replica, read by the app's endpoints
_SERVICE = None


def set_replica_service(service) -> None:
    global _SERVICE
    _SERVICE = service


def replica_service():
    return _SERVICE


def deployment(options, job, ready, *, workers: int):
    """The Serve application: the API app as the ingress of ``workers`` replicas of the loaded model."""
    from ray import serve

    from sd_utils.jobs.ray_job import actor_resources
    from sd_utils.serve.server import create_app

    api = create_app(replica_service, credentials=parse_credentials(options.api_auth))
    actor = actor_resources(job.provider, workers)

    @serve.deployment(
        name="sdxl-olive",
        num_replicas=workers,
        ray_actor_options=actor,
        max_ongoing_requests=64,  # progress and interrupt must get through while a replica generates
        health_check_period_s=5,
    )
    @serve.ingress(api)
    class Replica:
        def __init__(self, options, job, ready):
            from sd_utils.serve.service import GenerationService

            set_replica_service(GenerationService(options, job, ready, models=options.serve_model))

    return Replica.bind(options, job, ready)


def serve_on_ray(options, job, ready, *, block: bool = True) -> int:
    """Start Ray (a local runtime, or join ``--ray ADDRESS``), deploy, and serve on ``--host``:``--port`` until
    interrupted (``block=False``: return once the replicas are up; tests and benchmarks)."""
    from sd_utils.jobs.ray_job import check_reachable, default_workers, start_ray

    try:
        from ray import serve
    except ImportError as error:
        raise SetupError(f"--serve --ray needs Ray Serve ({error}): pip install 'ray[serve]==2.60.0'") from None
    address = None if options.ray == "local" else options.ray
    if address is not None:
        check_reachable(address)
    start_ray(address)
    workers = options.workers or default_workers(job.provider)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": options.host, "port": options.port})
    serve.run(deployment(options, job, ready, workers=workers), name="sdxl-olive", route_prefix="/")
    print(
        f"Serving A1111's API on http://{options.host}:{options.port}/sdapi/v1 with Ray Serve, {workers} replica(s) "
        "(Ctrl+C stops)",
        flush=True,
    )
    if not block:
        return 0
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        stop()
    return 0


def stop() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
