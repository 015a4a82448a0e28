"""Load an optimized pipeline folder into ONNX Runtime sessions: static shapes, CUDA graph, tiling, ``low_vram``."""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sd_utils.optimize.recipe import read_record
from sd_utils.runtime import optimum_adapter, token_table
from sd_utils.runtime.controlnet import OrtControlNet, SessionRunner, residual_feeds
from sd_utils.runtime.cuda_graph import (
    BatchGraphs,
    CudaGraphRunner,
    DeviceRunner,
    cuda_graph_session,
    shared_initializers,
    take_shared_weights,
    unet_output_shapes,
)
from sd_utils.runtime.deep_cache import REFRESH, SHALLOW, CachedUNet, refresh_output_shapes
from sd_utils.runtime.lora_weights import lora_initializers, touches
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
from sd_utils.runtime.vae_tiling import decode_in_slices, decode_tiled, tiled_shape
from sd_utils.runtime.weight_overrides import model_with_initializers
from sd_utils.sources.embeddings import Embeddings
from sd_utils.sources.lora import LoraFile
from sd_utils.sources.model_spec import ModelSpec, Shape, free_dimension_overrides, residual_shapes, submodel_io

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoadedPipeline:
    pipeline: Any  # optimum ORTStableDiffusionXL(Img2Img)Pipeline
    spec: ModelSpec
    folder: Path
    provider: Provider
    shape: Shape | None  # the static shape the sessions are pinned to; None with --dynamic_dims
    model_label: str
    unet_graph: CudaGraphRunner | BatchGraphs | None = None  # the UNet replayed as a CUDA graph (per batch), when it is
    vae_tiling: bool = False  # the VAE decoder decodes tile by tile (sd_utils/vae_tiling.py)
    low_vram: bool = False  # the text encoders exist only while they encode a prompt (see encode_prompt)
    # gives the pipeline a new text encoder part of ``folder``, its session made as load_pipeline made the others
    new_text_encoder: Callable[[str], None] | None = None
    words: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)  # embedding word -> token ids
    loras: tuple = ()  # the run-time LoRAs in its weights (sources.lora.LoraFile)
    # part -> what set its session's weights (PartSessions.key): which sessions another LoRA set can take over
    session_keys: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
    controlnets: tuple = ()  # OrtControlNet per --controlnet, when the pipeline is diffusers' ControlNet one
    unet_cache: CachedUNet | None = None  # the UNet under DeepCache (--cache_interval), when it is
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
    loras: tuple[LoraFile, ...] = (),
    reuse: LoadedPipeline | None = None,
    controlnets: tuple[Path, ...] = (),
    deep_cache: bool = False,
) -> LoadedPipeline:
    """Create ORT sessions for the pipeline folder; ``shape`` pins every symbolic dim (static shapes).

    ``use_io_binding`` (default: on for GPU providers that optimum can bind, i.e. CUDA) keeps the denoising loop's
    tensors on the device: no host round trip per step. ``cuda_graph`` (default: on for CUDA with static shapes)
    replays the UNet as a CUDA graph instead of launching its kernels one by one; a UNet that cannot be captured
    (some node not on the CUDA EP) runs as usual, with a warning. ``vae_tiling`` decodes tile by tile, the decoder's
    dims pinned to the tile's shape. ``low_vram`` frees the text encoders' memory after they have encoded the prompt
    (:func:`encode_prompt`) and drops a base model's VAE encoder, which text-to-image never runs. ``task`` picks
    optimum's pipeline: ``text2img``, ``img2img`` or ``inpaint`` (default: img2img for a refiner, text2img
    otherwise). ``embeddings``: textual-inversion vectors put into the text encoders' token tables. ``loras``:
    run-time LoRAs, their changes put into the weights of the sessions they touch. ``controlnets``: optimized
    ControlNet folders; they and the UNet that takes their residuals run in diffusers' ControlNet pipeline.
    ``deep_cache``: the UNet runs as DeepCache's two graphs (``runtime/deep_cache.py``); both CUDA graphs where the
    UNet would be one. ``reuse``: a pipeline of the same folder and settings with other ``loras``: its sessions of
    the parts whose weights stay the same are taken over, the others made again (switching LoRAs)."""
    task = task or ("img2img" if spec.is_refiner else "text2img")
    providers, provider_options = session_providers(provider, device_id)
    overrides, batch_dims = _dimensions(spec, shape, vae_tiling=vae_tiling, controlnets=bool(controlnets))
    options = session_options(provider, overrides)
    io_binding = provider.io_binding if use_io_binding is None else use_io_binding
    static = f" (static shapes: batch {shape.batch}, {shape.width}x{shape.height})" if shape else ""
    cuda_graph = _uses_cuda_graph(provider, shape, cuda_graph)
    parts = PartSessions(folder, provider, device_id, overrides, embeddings or Embeddings(), loras, spec.root)
    parts.folders.update(_unet_folder(controlnets=bool(controlnets), deep_cache=deep_cache))
    parts.batch_dims = batch_dims
    with memory_errors(provider, f"loading {folder}", "" if provider.name == "cpu" else "use --provider cpu"):
        share_arena(provider, device_id)
        sessions, runner = _sessions_to_make(parts, spec, reuse, cuda_graph=cuda_graph)
        graphed = " (UNet as a CUDA graph)" if runner else ""
        logger.info("loading %s with %s%s%s", folder, provider.execution_provider, static, graphed)
        pipeline = optimum_adapter.pipeline_class(task).from_pretrained(
            folder,
            export=False,
            providers=providers,
            provider_options=provider_options,
            session_options=options,
            use_io_binding=io_binding,
            **{f"{part}_session": session for part, session in sessions.items()},
        )
    _check_providers(pipeline, provider)
    _adapt(pipeline, spec, runner=runner, vae_tiling=vae_tiling, drop_encoder=low_vram and task == "text2img")
    pipeline, nets = _controlled(pipeline, parts, spec, task, controlnets, reuse, runner=runner)
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
        new_text_encoder=functools.partial(_new_text_encoder, pipeline, parts, io_binding),
        words=parts.embeddings.words,
        build_record=read_record(folder) or {},
        scheduler_config=dict(pipeline.scheduler.config),
        loras=loras,
        session_keys={part: parts.key(part) for part in spec.submodels},
        controlnets=tuple(nets),
        unet_cache=_deep_cached(pipeline, parts, spec, runner=runner) if deep_cache else None,  # no ControlNets then
    )


def _unet_folder(*, controlnets: bool, deep_cache: bool) -> dict[str, str]:
    """The graph the pipeline's UNet part runs, where not the plain one: the one that takes ControlNet residuals, or
    DeepCache's refresh graph."""
    return {"unet": "unet_controlnet"} if controlnets else {"unet": REFRESH} if deep_cache else {}


def _check_providers(pipeline, provider: Provider) -> None:
    for part in pipeline.parts:
        check_session_provider(part.session, provider, str(part.path.parent))


def _dimensions(
    spec: ModelSpec, shape: Shape | None, *, vae_tiling: bool, controlnets: bool
) -> tuple[dict | None, dict[str, int]]:
    """(the value of every symbolic dim the sessions meet at ``shape``, None: dims left free; the denoising
    sessions' batch dims, with their values at the run's start, when the batch is free). Under --cfg_cutoff the
    denoising sessions run at batch 2B, then B, so their batch dims are not among the first: a session pins them per
    batch, or leaves them free."""
    if shape is None:
        return None, {}
    overrides = free_dimension_overrides(spec, shape)
    if vae_tiling:
        overrides.update(submodel_io(spec, "vae_decoder").dim_values(tiled_shape(spec, shape)))
    for name in ("unet_controlnet", "controlnet") if controlnets else ():
        overrides.update(submodel_io(spec, name).dim_values(shape))
    batch = {name: value for name, value in overrides.items() if shape.free_batch and _denoising_batch(name)}
    return {name: value for name, value in overrides.items() if name not in batch}, batch


def _uses_cuda_graph(provider: Provider, shape: Shape | None, asked: bool | None) -> bool:
    """Whether the UNet runs as a CUDA graph: on providers that can, with static shapes, unless told not to. A batch
    that changes within a run (--cfg_cutoff) gets a graph per batch (``cuda_graph.BatchGraphs``)."""
    return asked is not False and provider.cuda_graph and shape is not None


def _denoising_batch(dim: str) -> bool:
    return dim.startswith(("unet_", "controlnet_")) and dim.endswith("_batch")


def _controlled(pipeline, parts: PartSessions, spec: ModelSpec, task: str, controlnets, reuse, *, runner):
    """optimum's ``pipeline`` (its UNet session: the one that takes residuals; ``runner`` when it is a CUDA graph)
    as diffusers' ControlNet pipeline for ``task``, with a session per ControlNet folder (``reuse``'s when it has
    the same ones), each a CUDA graph too when the UNet is one; ``pipeline`` as it is without ControlNets."""
    if not controlnets:
        return pipeline, []
    run = runner or _plain_runner(parts, pipeline.unet.session, unet_output_shapes(spec.latent_channels))
    residuals = functools.partial(residual_feeds, spec)
    optimum_adapter.set_unet_forward(pipeline, lambda feeds: run(feeds)[0], residuals)
    wanted = [folder / "controlnet" for folder in controlnets]
    if reuse is not None and [net.folder for net in reuse.controlnets] == wanted:
        nets = list(reuse.controlnets)
    else:
        nets = [_controlnet(parts, spec, path, graphed=runner is not None, device=pipeline.device) for path in wanted]
    return optimum_adapter.controlnet_pipeline(pipeline, nets, task), nets


def _controlnet(parts: PartSessions, spec: ModelSpec, path: Path, *, graphed: bool, device) -> OrtControlNet:
    """The ControlNet in ``path``: a CUDA graph when the UNet is one (and ORT can capture it), else a plain session."""
    shapes = functools.partial(_residual_shapes, spec)
    run = _cuda_graph_runner(parts, path / "model.onnx", shapes, label="a ControlNet") if graphed else None
    run = run or _plain_runner(parts, parts.plain_session(path, denoising=True), shapes)
    return OrtControlNet(run, path, device=device)


def _residual_shapes(spec: ModelSpec, feeds: dict[str, Any]) -> list[tuple[int, ...]]:
    return residual_shapes(spec, np.shape(feeds["sample"]))


def _deep_cached(pipeline, parts: PartSessions, spec: ModelSpec, *, runner: CudaGraphRunner | None) -> CachedUNet:
    """The pipeline's UNet (the refresh graph's session, ``runner`` when it is a CUDA graph) under DeepCache, with a
    session of the shallow graph (a CUDA graph too when the UNet is one)."""
    shallow, shapes = None, unet_output_shapes(spec.latent_channels)
    if runner is not None:
        shallow = _cuda_graph_runner(parts, parts.model_file(SHALLOW), shapes, label="the shallow UNet", part=SHALLOW)
    shallow = shallow or _plain_runner(parts, parts.session(SHALLOW), shapes)
    inputs = tuple(meta.name for meta in shallow.session.get_inputs())
    refresh_shapes = refresh_output_shapes(spec.latent_channels, spec.cache_channels)
    cached = CachedUNet(runner or _plain_runner(parts, pipeline.unet.session, refresh_shapes), shallow, inputs)
    optimum_adapter.set_unet_forward(pipeline, cached)
    return cached


def _plain_runner(parts: PartSessions, session, output_shapes) -> SessionRunner | DeviceRunner:
    """A denoising session that is no CUDA graph: on CUDA on bound device buffers (no host round trip per step),
    elsewhere through host arrays."""
    if parts.provider.name == "cuda":
        return DeviceRunner(session, output_shapes=output_shapes, device_id=parts.device_id)
    return SessionRunner(session)


def _new_text_encoder(pipeline, parts: PartSessions, io_binding: bool, name: str) -> None:
    """Give ``pipeline`` a new session of text encoder ``name`` (``low_vram`` drops them)."""
    optimum_adapter.add_text_encoder(pipeline, name, parts.session(name), io_binding=io_binding)


def _adapt(pipeline, spec: ModelSpec, *, runner: CudaGraphRunner | None, vae_tiling: bool, drop_encoder: bool) -> None:
    """What the tool changes in optimum's pipeline: the CUDA-graph UNet, the VAE decoder's slices and tiles, no VAE
    encoder."""
    if runner:
        optimum_adapter.set_unet_forward(pipeline, lambda feeds: runner(feeds)[0])

    def decoder(decode, latents):  # tile by tile; in each call as many images at once as the decoder takes
        sliced = functools.partial(decode_in_slices, decode, spec=spec)
        return decode_tiled(sliced, latents, spec) if vae_tiling else sliced(latents)

    optimum_adapter.set_vae_decoder_forward(pipeline, decoder)
    if drop_encoder:
        optimum_adapter.drop_parts(pipeline, ["vae_encoder"])


# the parts whose sessions get initializer overrides: run-time LoRA weights, embeddings' token-table rows
OVERRIDABLE = ("unet", "text_encoder", "text_encoder_2", SHALLOW)
# the parts that denoise (a ControlNet's session is made apart)
DENOISING = ("unet", SHALLOW)


@dataclasses.dataclass
class PartSessions:
    """Makes the session of one part of a build with what changes its weights: the LoRAs that touch it and the
    embeddings' rows of its token table, both as initializers of a model file next to the build's
    (``weight_overrides.py``); the build's own files stay as built."""

    folder: Path
    provider: Provider
    device_id: int
    dims: dict | None  # free-dimension overrides (static shapes)
    embeddings: Embeddings
    loras: tuple[LoraFile, ...]
    config_root: Path  # the model folder: its configs place the LoRAs' layers, as the run's checks did
    folders: dict = dataclasses.field(default_factory=dict)  # part -> its graph's folder, where not its own name
    # the denoising sessions' batch dims and their values at the run's start, when they meet two batches (--cfg_cutoff)
    batch_dims: dict = dataclasses.field(default_factory=dict)
    _models: dict = dataclasses.field(default_factory=dict)  # part -> its model file
    # part -> what keeps its changed model file's folder (its sessions hold it too, see session())
    _holders: dict = dataclasses.field(default_factory=dict)

    def key(self, part: str) -> tuple:
        """What sets the part's weights; two sessions of a part with the same key are interchangeable."""
        loras = tuple((lora.tensors_sha256 or lora.sha256, lora.scale) for lora in self.loras if touches(lora, part))
        return loras, tuple(sorted(self.embeddings.rows.get(part, {})))

    def initializers(self, part: str) -> dict[str, np.ndarray]:
        """The part's initializers that the LoRAs and embeddings change, with their new values."""
        values = {}
        if part in OVERRIDABLE:
            submodel = self.folders.get(part, part)
            values = lora_initializers(
                self.folder, submodel, self.loras, config_root=self.config_root, partial=submodel == SHALLOW
            )
        rows = self.embeddings.rows.get(part)
        if rows:
            values.update(token_table.with_rows(self.folder / part / "model.onnx", rows))
        return values

    def model_file(self, part: str) -> Path:
        """The part's model file: the build's, or (when something changes its weights) one with those changes,
        written once per part."""
        if part not in self._models:
            folder = self.folder / self.folders.get(part, part)
            values = self.initializers(part)
            if values:
                path, holder = model_with_initializers(folder / "model.onnx", values)
                shutil.copy2(folder / "config.json", path.parent / "config.json")  # optimum reads it beside the model
                self._models[part] = path
                self._holders[part] = holder
            else:
                self._models[part] = folder / "model.onnx"
        return self._models[part]

    def options(self):
        return session_options(self.provider, self.dims)

    @property
    def free_batch(self) -> bool:
        return bool(self.batch_dims)

    def batch_options(self, batch: int, weights: dict[str, Any]):
        """Session options of a denoising session pinned to ``batch`` that takes ``weights`` (initializers by name,
        ``cuda_graph.shared_initializers``) instead of loading its own."""
        options = session_options(self.provider, {**self.dims, **dict.fromkeys(self.batch_dims, batch)})
        take_shared_weights(options, weights)
        return options

    @property
    def denoising_options(self) -> dict[str, str]:
        """Provider options of the UNets' and ControlNets' sessions beyond the provider's own."""
        return dict(self.provider.free_batch_options) if self.free_batch else {}

    def session(self, part: str):
        """A session of the part with its changes; it keeps its changed model file (if any) as long as it lives,
        also when another pipeline takes it over."""
        where, denoising = self.folder / self.folders.get(part, part), part in DENOISING
        session = self.plain_session(self.model_file(part).parent, where=where, denoising=denoising)
        session.weight_files = self._holders.get(part)
        return session

    def plain_session(self, folder: Path, *, where: Path | None = None, denoising: bool = False):
        """A session of the graph in ``folder`` (``where``: the build folder named in a provider error; ``denoising``:
        a UNet's or ControlNet's, with :attr:`denoising_options`)."""
        extra = self.denoising_options if denoising else None
        model = str(folder / "model.onnx")
        session = new_session(model, self.provider, self.device_id, options=self.options(), extra_options=extra)
        check_session_provider(session, self.provider, str(where or folder))
        return session


def _sessions_to_make(
    parts: PartSessions, spec: ModelSpec, reuse: LoadedPipeline | None, *, cuda_graph: bool
) -> tuple[dict[str, Any], CudaGraphRunner | None]:
    """The sessions load_pipeline hands optimum instead of letting it make them (by part), and the CUDA-graph UNet:
    those ``reuse`` has with the same weights, and new ones for parts whose weights change."""
    sessions: dict[str, Any] = {}
    runner = None
    for part in spec.submodels:
        key = parts.key(part)
        old = getattr(reuse.pipeline, part, None) if reuse is not None and reuse.session_keys.get(part) == key else None
        if reuse is not None and old is None:
            _release(reuse, part)  # its memory goes before the new session's comes (two full-size UNets do not fit)
        if part == "unet" and cuda_graph:
            shapes = unet_output_shapes(spec.latent_channels)
            if parts.folders.get(part) == REFRESH:  # DeepCache's full UNet: the feature is a second output
                shapes = refresh_output_shapes(spec.latent_channels, spec.cache_channels)
            runner = reuse.unet_graph if old is not None and reuse.unet_graph else None
            runner = runner or _cuda_graph_runner(parts, parts.model_file(part), shapes, label="the UNet", part=part)
            if runner:
                sessions[part] = runner.session
                continue
        if old is not None:
            sessions[part] = old.session
        elif any(key) or part in parts.folders or (part in DENOISING and parts.denoising_options):
            sessions[part] = parts.session(part)
    return sessions, runner


def _release(replaced: LoadedPipeline, part: str) -> None:
    """Drop ``part``'s session (and the CUDA graph over it) from a pipeline that is being replaced."""
    optimum_adapter.drop_parts(replaced.pipeline, [part])
    shared_weights = isinstance(replaced.unet_graph, BatchGraphs)
    if part == "unet" and replaced.unet_graph is not None:
        object.__setattr__(replaced, "unet_graph", None)  # frozen: this pipeline is on its way out
    gc.collect()  # optimum's parts and pipelines refer to each other: free the session now, not at some later pass
    if part == "unet" and shared_weights:
        import torch

        torch.cuda.empty_cache()  # the weights were torch's: give their memory back for the new sessions


def _cuda_graph_runner(
    parts: PartSessions, model_file: Path, output_shapes, *, label: str, part: str | None = None
) -> CudaGraphRunner | BatchGraphs | None:
    """``model_file``'s session (of the build's ``part``, or a ControlNet's) replayed as a CUDA graph, or None (with
    a warning) when ORT cannot capture it. With a free batch (--cfg_cutoff), a session per batch on one copy of the
    weights."""
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument

    def runner(options) -> CudaGraphRunner:
        extra = dict(parts.provider.options)  # a static batch per session: the provider's own options
        session, stream = cuda_graph_session(
            model_file, device_id=parts.device_id, sess_options=options, extra_options=extra
        )
        session.weight_files = parts._holders.get(part)
        return CudaGraphRunner(session, stream, output_shapes=output_shapes, device_id=parts.device_id)

    try:
        if not parts.free_batch:
            return runner(parts.options())
        weights = shared_initializers(model_file, f"cuda:{parts.device_id}")
        first = max(parts.batch_dims.values())  # with guidance, where the run starts
        return BatchGraphs(lambda batch: runner(parts.batch_options(batch, weights[1])), first, weights)
    # ORT refuses graph capture when some node would run outside the CUDA EP (Fail), or weights it cannot take
    except (Fail, InvalidArgument) as error:
        if out_of_memory(error):
            raise
        logger.warning("%s runs without a CUDA graph: %s", label, str(error).strip().splitlines()[0])
    if parts.free_batch:  # torch's copy of the weights, if read, back to the device for the plain session's own
        import torch

        weights = None
        torch.cuda.empty_cache()
    return None
