"""Load an optimized pipeline folder into ONNX Runtime sessions: static shapes, CUDA graph, tiling, ``low_vram``."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sd_utils.optimize.recipe import read_record
from sd_utils.runtime import optimum_adapter, token_table
from sd_utils.runtime.cuda_graph import CudaGraphUNet, cuda_graph_session
from sd_utils.runtime.providers import (
    Provider,
    check_session_provider,
    memory_errors,
    new_session,
    out_of_memory,
    session_options,
    session_providers,
    share_arena,
)
from sd_utils.runtime.vae_tiling import decode_tiled, tiled_shape
from sd_utils.sources.embeddings import Embeddings
from sd_utils.sources.model_spec import ModelSpec, Shape, free_dimension_overrides, submodel_io

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoadedPipeline:
    pipeline: Any  # optimum ORTStableDiffusionXL(Img2Img)Pipeline
    spec: ModelSpec
    folder: Path
    provider: Provider
    shape: Shape | None  # the static shape the sessions are pinned to; None with --dynamic_dims
    model_label: str
    unet_graph: CudaGraphUNet | None = None  # the UNet replayed as a CUDA graph, when it is
    vae_tiling: bool = False  # the VAE decoder decodes tile by tile (sd_utils/vae_tiling.py)
    low_vram: bool = False  # the text encoders exist only while they encode a prompt (see encode_prompt)
    # gives the pipeline a new text encoder part of ``folder``, its session made as load_pipeline made the others
    new_text_encoder: Callable[[str], None] | None = None
    words: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)  # embedding word -> token ids
    token_tables: list = dataclasses.field(default_factory=list, compare=False, repr=False)  # kept for ORT
    # build.json: what the build was made from (checkpoint file, LoRAs, VAE) and its digest, recorded in the PNGs
    build_record: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
    # the model folder's own scheduler config (--scheduler makes its scheduler from it)
    scheduler_config: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
    # the last prompt's embeddings, by (prompt, negative prompt, images per call, CFG): see encode_prompt
    prompt_embeddings: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def build_digest(self) -> str | None:
        """The build's recipe digest (build.json): the PNGs' "Model hash" when no checkpoint file has one."""
        return self.build_record.get("digest")


def load_pipeline(
    folder: Path,
    spec: ModelSpec,
    *,
    provider: Provider,
    device_id: int = 0,
    shape: Shape | None,
    model_label: str,
    use_io_binding: bool | None = None,
    cuda_graph: bool | None = None,
    vae_tiling: bool = False,
    low_vram: bool = False,
    task: str | None = None,
    embeddings: Embeddings | None = None,
) -> LoadedPipeline:
    """Create ORT sessions for the pipeline folder; ``shape`` pins every symbolic dim (static shapes).

    ``use_io_binding`` (default: on for GPU providers that optimum can bind, i.e. CUDA) keeps the denoising loop's
    tensors on the device: no host round trip per step. ``cuda_graph`` (default: on for CUDA with static shapes)
    replays the UNet as a CUDA graph instead of launching its kernels one by one; a UNet that cannot be captured
    (some node not on the CUDA EP) runs as usual, with a warning. ``vae_tiling`` decodes tile by tile, the
    decoder's dims pinned to the tile's shape. ``low_vram`` frees the text encoders' memory after they have encoded
    the prompt (:func:`encode_prompt`) and drops a base model's VAE encoder, which text-to-image never runs.
    ``task`` picks optimum's pipeline: ``text2img``, ``img2img`` or ``inpaint`` (default: img2img for a refiner,
    text2img otherwise). ``embeddings``: textual-inversion vectors put into the text encoders' token tables.
    """
    if task is None:
        task = "img2img" if spec.is_refiner else "text2img"
    cls = optimum_adapter.pipeline_class(task)
    providers, provider_options = session_providers(provider, device_id)
    overrides = free_dimension_overrides(spec, shape) if shape is not None else None
    if overrides is not None and vae_tiling:
        overrides.update(submodel_io(spec, "vae_decoder").dim_values(tiled_shape(spec, shape)))
    options = session_options(provider, overrides)
    io_binding = provider.io_binding if use_io_binding is None else use_io_binding
    static = f" (static shapes: batch {shape.batch}, {shape.width}x{shape.height})" if shape else ""
    cuda_graph = (True if cuda_graph is None else cuda_graph) and provider.cuda_graph and shape is not None
    with memory_errors(provider, f"loading {folder}", "" if provider.name == "cpu" else "use --provider cpu"):
        share_arena(provider, device_id)
        runner = _cuda_graph_unet(folder, provider, device_id, options) if cuda_graph else None
        graphed = " (UNet as a CUDA graph)" if runner else ""
        logger.info("loading %s with %s%s%s", folder, provider.execution_provider, static, graphed)
        pipeline = cls.from_pretrained(
            folder,
            export=False,
            providers=providers,
            provider_options=provider_options,
            session_options=options,
            use_io_binding=io_binding,
            **({"unet_session": runner.session} if runner else {}),
        )
    for part in pipeline.parts:
        check_session_provider(part.session, provider, str(part.path.parent))
    if runner:
        optimum_adapter.set_unet_forward(pipeline, runner)
    if vae_tiling:
        optimum_adapter.set_vae_decoder_forward(pipeline, lambda decode, latents: decode_tiled(decode, latents, spec))
    if low_vram and task == "text2img":
        optimum_adapter.drop_parts(pipeline, ["vae_encoder"])

    embeddings = embeddings or Embeddings()
    kept: list = []  # the token tables ONNX Runtime reads from (it does not copy them)
    new_text_encoder = _text_encoders(pipeline, folder, provider, device_id, overrides, io_binding, embeddings, kept)
    return LoadedPipeline(
        pipeline,
        spec,
        folder,
        provider,
        shape,
        model_label,
        unet_graph=runner,
        vae_tiling=vae_tiling,
        low_vram=low_vram,
        new_text_encoder=new_text_encoder,
        words=embeddings.words,
        token_tables=kept,
        build_record=read_record(folder) or {},
        scheduler_config=dict(pipeline.scheduler.config),
    )


def _text_encoders(pipeline, folder, provider, device_id, overrides, io_binding, embeddings, kept):
    """A function that gives ``pipeline`` a new session of text encoder ``name`` (``low_vram`` drops them), with the
    embeddings' rows in its token table; what ONNX Runtime must keep reading goes to ``kept``. The sessions
    ``from_pretrained`` made know no embedding: those are made again with them now."""

    def new_text_encoder(name: str) -> None:
        model_file = folder / name / "model.onnx"
        rows = embeddings.rows.get(name)
        options = session_options(provider, overrides)
        if rows:
            kept.extend(token_table.add_rows(options, model_file, rows))
        session = new_session(str(model_file), provider, device_id, options=options)
        check_session_provider(session, provider, str(folder / name))
        optimum_adapter.add_text_encoder(pipeline, name, session, io_binding=io_binding)

    for name in embeddings.rows:
        if getattr(pipeline, name, None) is not None:
            new_text_encoder(name)
    return new_text_encoder


def _cuda_graph_unet(folder: Path, provider: Provider, device_id: int, options) -> CudaGraphUNet | None:
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    try:
        session, stream = cuda_graph_session(
            folder / "unet" / "model.onnx",
            device_id=device_id,
            sess_options=options,
            extra_options=dict(provider.options),
        )
    except Fail as error:  # ORT refuses graph capture when some node would run outside the CUDA EP
        if out_of_memory(error):
            raise
        logger.warning("the UNet runs without a CUDA graph: %s", str(error).strip().splitlines()[0])
        return None
    return CudaGraphUNet(session, stream, device_id=device_id)
