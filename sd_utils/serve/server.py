"""``--serve``: A1111's ``/sdapi/v1`` endpoints over a :class:`~sd_utils.serve.service.GenerationService`, as a
FastAPI app served by uvicorn (or by Ray Serve, ``ray_serve.py``).

Endpoints are plain (synchronous) functions: FastAPI runs each in its thread pool, so ``/progress`` and
``/interrupt`` answer while a generation runs, and requests wait for their turn in the service's queue. Bad input is
422 with A1111's error body (``error``, ``detail``: the tool's one line); out of memory 507; anything else 500 with
one line. ``--api_auth`` puts every endpoint behind HTTP basic authentication.
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
from collections.abc import Callable
from typing import Any

from sd_utils.errors import OutOfMemoryError, SdxlOliveError, UserInputError
from sd_utils.options import parse_credentials
from sd_utils.serve import a1111

logger = logging.getLogger(__name__)

PREFIX = "/sdapi/v1"
MAX_BODY = 64 * 2**20  # bytes of one request body: a few base64 images at the upload limit (docs/serve.md)


def _authorized(header: str | None, credentials: list[tuple[str, str]]) -> bool:
    if not header or not header.lower().startswith("basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    matches = [secrets.compare_digest(user, u) & secrets.compare_digest(password, p) for u, p in credentials]
    return any(matches)


def _error(status: int, error: SdxlOliveError | Exception, kind: str | None = None):
    from fastapi.responses import JSONResponse

    text = " ".join(str(error).split())
    return JSONResponse(status_code=status, content={"error": kind or type(error).__name__, "detail": text})


def create_app(service: Callable[[], Any], *, credentials: list[tuple[str, str]] | None = None, max_body=MAX_BODY):
    """The FastAPI app; ``service()`` gives the :class:`GenerationService` that runs the requests (the replica's
    own under Ray Serve)."""
    from fastapi import FastAPI

    api = FastAPI(title="sdxl-olive", description="A1111-compatible /sdapi/v1 API", docs_url="/docs", redoc_url=None)
    _add_guards(api, credentials or [], max_body)
    _add_routes(api, service)
    return api


def _add_guards(api, credentials: list[tuple[str, str]], max_body: int) -> None:
    """Authentication, the body size limit, and errors as A1111's error bodies."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    @api.middleware("http")
    async def guard(request: Request, call_next):
        if credentials and not _authorized(request.headers.get("authorization"), credentials):
            return JSONResponse(
                status_code=401,
                content={"error": "Unauthorized", "detail": "this server needs a user and password (HTTP basic)"},
                headers={"WWW-Authenticate": 'Basic realm="sdxl-olive"'},
            )
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_body:
            return JSONResponse(
                status_code=413,
                content={"error": "TooLarge", "detail": f"request body of {int(length):,} bytes is over {max_body:,}"},
            )
        return await call_next(request)

    @api.exception_handler(UserInputError)
    def bad_input(_request, error: UserInputError):
        return _error(422, error)

    @api.exception_handler(OutOfMemoryError)
    def out_of_memory(_request, error: OutOfMemoryError):
        return _error(507, error)

    @api.exception_handler(Exception)
    def failed(_request, error: Exception):
        logger.exception("request failed")
        return _error(
            500, error if isinstance(error, SdxlOliveError) else RuntimeError(f"{type(error).__name__}: {error}")
        )


def _add_routes(api, service: Callable[[], Any]) -> None:
    from fastapi import Body

    @api.post(f"{PREFIX}/txt2img")
    def txt2img(payload: dict[str, Any] = Body(...)):  # noqa: B008 - FastAPI's way to take a JSON object
        return service().generate(payload, "txt2img")

    @api.post(f"{PREFIX}/img2img")
    def img2img(payload: dict[str, Any] = Body(...)):  # noqa: B008
        return service().generate(payload, "img2img")

    @api.get(f"{PREFIX}/progress")
    def progress(skip_current_image: bool = False):
        return service().progress_view()

    @api.post(f"{PREFIX}/interrupt")
    def interrupt():
        service().interrupt()
        return {}

    @api.post(f"{PREFIX}/png-info")
    def png_info(payload: dict[str, Any] = Body(...)):  # noqa: B008
        return a1111.png_info(payload.get("image"))

    @api.get(f"{PREFIX}/sd-models")
    def sd_models():
        return service().sd_models()

    @api.get(f"{PREFIX}/options")
    def get_options():
        return service().settings()

    @api.post(f"{PREFIX}/options")
    def set_options(payload: dict[str, Any] = Body(...)):  # noqa: B008
        service().set_settings(payload)
        return None

    @api.get(f"{PREFIX}/samplers")
    def samplers():
        return a1111.samplers()

    @api.get(f"{PREFIX}/schedulers")
    def schedulers():
        return a1111.schedulers()

    @api.get(f"{PREFIX}/loras")
    def loras():
        return service().loras()

    @api.get(f"{PREFIX}/scripts")
    def scripts():
        return {"txt2img": [], "img2img": []}

    for path in ("sd-vae", "upscalers", "latent-upscale-modes", "hypernetworks", "face-restorers", "prompt-styles"):
        api.add_api_route(f"{PREFIX}/{path}", lambda: [], methods=["GET"], name=path)


def serve(options, job, ready) -> int:
    """Load the model and serve the API on ``--host``:``--port`` until interrupted."""
    import uvicorn

    from sd_utils.serve.service import GenerationService

    credentials = parse_credentials(options.api_auth)
    if options.host not in ("127.0.0.1", "localhost", "::1") and not credentials:
        logger.warning("serving on %s without --api_auth: anyone who can reach this port can use it", options.host)
    service = GenerationService(options, job, ready, models=options.serve_model)
    api = create_app(lambda: service, credentials=credentials)
    print(f"Serving A1111's API on http://{options.host}:{options.port}{PREFIX} (Ctrl+C stops)", flush=True)
    uvicorn.run(api, host=options.host, port=options.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0
