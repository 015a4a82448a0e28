"""LoRA files: checked against the model before anything runs, their identity, and their layers.

diffusers reads every LoRA layout users have (diffusers/PEFT keys, kohya/A1111 ``lora_unet_*``/``lora_te1_*``/
``lora_te2_*`` keys, in diffusers' or the original block names) and converts them to one layout; what the file
changes (UNet, text encoders) is read from that. A LoRA is applied either at run time, by changing the optimized
graphs' weights when their sessions are made (:func:`lora_layers` gives the weight changes,
``sd_utils/runtime/lora_weights.py`` applies them), or fused into the weights before export (``--fuse_loras``,
``sd_utils/optimize/lora_fusion.py``). Both load the file with diffusers' loader (:func:`load_adapter`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sd_utils.errors import ModelNotFoundError
from sd_utils.sources import single_file

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoraFile(single_file.HashedFile):
    """One ``--lora``: the file and its content hash, its scale and the components it changes."""

    scale: float = 1.0
    targets: tuple[str, ...] = ()  # diffusers components: unet, text_encoder, text_encoder_2
    tensors_sha256: str = ""  # of the tensor data alone: A1111's and Civitai's LoRA hash (its first 12 digits)

    def identity(self) -> dict[str, Any]:
        """What a build records of this LoRA (its content, not its path: a moved file is the same LoRA)."""
        return {
            **super().identity(),
            "scale": self.scale,
            "targets": list(self.targets),
            "tensors_sha256": self.tensors_sha256,
        }


def lora_state_dict(path: Path) -> dict:
    """The LoRA's tensors in diffusers' layout (keys prefixed by the component), by diffusers' own converters."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging
    from safetensors.torch import load_file

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its notes on formats it converted
    try:
        state, _ = StableDiffusionXLPipeline.lora_state_dict(load_file(path))
    except (ValueError, KeyError, RuntimeError, IndexError) as error:
        raise ModelNotFoundError(
            f"--lora {path} is in a LoRA layout diffusers cannot read ({str(error).splitlines()[0][:160]}); give an "
            "SDXL LoRA in diffusers/PEFT or kohya/A1111 format"
        ) from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return state


def inspect_lora(path: Path, scale: float, *, components: tuple[str, ...], option: str = "--lora") -> LoraFile:
    """Check ``--lora path`` against a model with ``components``; one-line :class:`ModelNotFoundError` when it is not
    a LoRA, or changes a component the model does not have. A file is read once per version (path, size, time): a
    window or a job switching LoRAs pays for each file once."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ModelNotFoundError(f"{option} {path} is a folder; give the LoRA's .safetensors file in it")
    if not path.is_file():
        raise ModelNotFoundError(f"{option} {path}: no such file; check the path")
    inspected = _inspect(path.resolve(), single_file.file_identity(path), components)
    return dataclasses.replace(inspected, scale=scale)


@functools.lru_cache(maxsize=64)
def _inspect(path: Path, version: str, components: tuple[str, ...]) -> LoraFile:
    header = single_file.read_header(path, "--lora")
    if not single_file.looks_like_lora(header):
        raise ModelNotFoundError(
            f"--lora {path} holds no LoRA tensors (lora_A/lora_B or lora_down/lora_up); "
            + ("it is a model checkpoint: pass it as --model_id" if _is_model(header) else "give a LoRA file")
        )
    state = lora_state_dict(path)
    targets = tuple(sorted({key.split(".", 1)[0] for key in state}))
    unknown = [target for target in targets if target not in components]
    if unknown or not targets:
        what = ", ".join(unknown) if unknown else "nothing this tool knows"
        raise ModelNotFoundError(
            f"--lora {path} changes {what}, which the model has not (it has {', '.join(components)}); "
            "give a LoRA made for this kind of model (an SDXL base LoRA for a base)"
        )
    return LoraFile(
        path=path,
        sha256=single_file.file_sha256(path),
        targets=targets,
        tensors_sha256=single_file.file_sha256(path, tensors_only=True),
    )


def _is_model(header: dict) -> bool:
    return any(key.startswith((single_file.UNET, "down_blocks.", "conditioner.")) for key in header)


def load_adapter(pipeline, lora: LoraFile, name: str) -> None:
    """Load one LoRA into the diffusers ``pipeline`` as adapter ``name``, by diffusers' own loader (every layout it
    reads); every one of its tensors must land on a module of the model."""
    from safetensors.torch import load_file

    try:
        with _diffusers_notes() as notes, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # the second LoRA's
            # the file's own tensors: diffusers converts them on the way in (kohya names, alphas, sgm block names)
            pipeline.load_lora_weights(load_file(lora.path), adapter_name=name)
    except (ValueError, RuntimeError, KeyError, IndexError) as error:
        raise ModelNotFoundError(
            f"--lora {lora.path} does not fit the model ({_first_reason(error)}); give a LoRA made for this model's "
            "architecture (an SDXL LoRA of the same sizes)"
        ) from None
    # PEFT loads the tensors it can place and only logs the others: a LoRA for another model would half apply
    unexpected = [note for note in notes if "unexpected keys" in note]
    if unexpected:
        raise ModelNotFoundError(
            f"--lora {lora.path} does not fit the model: it has layers the model has not ({unexpected[0][:160]}); "
            "give a LoRA made for this model's architecture"
        )
    loaded = {component for component, adapters in pipeline.get_list_adapters().items() if name in adapters}
    if not loaded:
        raise ModelNotFoundError(
            f"--lora {lora.path} does not fit the model: none of its layers is one of the model's; give a LoRA "
            "made for SDXL"
        )
    _check_every_layer_placed(pipeline, lora, name, components=loaded)


# the down (A) matrix of one LoRA layer in each layout diffusers reads: kohya, PEFT, diffusers' older one
_LAYER_KEYS = ("lora_down.weight", "lora_A.weight", "lora.down.weight")


def _check_every_layer_placed(pipeline, lora: LoraFile, name: str, *, components: set[str]) -> None:
    """Every LoRA layer of the file must have become an adapter layer of the model: diffusers' converters drop the
    keys they cannot map (another UNet layout), which would apply the LoRA in part, silently."""
    from safetensors import safe_open

    with safe_open(lora.path, framework="pt") as weights:
        in_file = sum(key.endswith(_LAYER_KEYS) for key in weights.keys())  # noqa: SIM118 (safe_open is no dict)
    placed = sum(
        1
        for component in components
        for _, module in getattr(pipeline, component).named_modules()
        if name in getattr(module, "lora_A", {})
    )
    if placed < in_file:
        raise ModelNotFoundError(
            f"--lora {lora.path}: {in_file - placed} of its {in_file} layers have no match in the model (it was "
            "made for another model's layout); give a LoRA made for this model"
        )


def _first_reason(error: BaseException) -> str:
    """The line of a loading error that says what differs (torch's "size mismatch for …" lines come after a
    heading)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    telling = [line for line in lines if "size mismatch" in line or "not found" in line]
    return ((telling or lines or [type(error).__name__])[0])[:200]


@contextlib.contextmanager
def _diffusers_notes() -> Iterator[list[str]]:
    """diffusers' (and PEFT's, through diffusers) warnings during the block, collected instead of printed: on a
    second adapter PEFT lists the first one's keys as missing, which is noise here."""
    from diffusers.utils import logging as diffusers_logging

    notes: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notes.append(record.getMessage())

    library = logging.getLogger("diffusers")
    handler = Collect(level=logging.WARNING)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_warning()
    diffusers_logging.disable_default_handler()
    library.addHandler(handler)
    try:
        yield notes
    finally:
        library.removeHandler(handler)
        diffusers_logging.enable_default_handler()
        diffusers_logging.set_verbosity(verbosity)


# ---------------------------------------------------------------------------------------------------- the layers


class LoraLayers:
    """One LoRA file's layers, loaded by diffusers and PEFT onto a copy of the model that has no weights
    (:func:`_weightless_pipeline`): each layer's change of its weight (PEFT's ``get_delta_weight``: up @ down x
    alpha / rank, convolutions included) without reading or holding the model's weights."""

    ADAPTER = "lora"

    def __init__(self, pipeline, components: tuple[str, ...]):
        self._pipeline = pipeline
        self.components = components

    def deltas(self, component: str) -> Iterator[tuple[str, Any]]:
        """(weight name, change at scale 1 as a float32 numpy array) of each of ``component``'s layers the LoRA
        changes; weight names are the component's own (``down_blocks.1.….to_q.weight``)."""
        import torch

        model = getattr(self._pipeline, component, None)
        if model is None:
            return
        for name, module in model.named_modules():
            if self.ADAPTER not in getattr(module, "lora_A", {}):
                continue
            if getattr(module, "use_dora", {}).get(self.ADAPTER):
                raise ModelNotFoundError(
                    f"a LoRA changes {component} layer {name} with DoRA, which run-time LoRAs do not apply; bake it "
                    "into a build with --fuse_loras"
                )
            with torch.no_grad():
                yield f"{name}.weight", module.get_delta_weight(self.ADAPTER).float().numpy()


def lora_layers(folder: Path, lora: LoraFile) -> LoraLayers:
    """The layers of ``lora`` for the model whose configs are in ``folder`` (a build folder: ``model_index.json``
    and a ``config.json`` per component); read once per version of the file (path, size, time)."""
    return _layers(Path(folder).resolve(), single_file.file_identity(lora.path), dataclasses.replace(lora, scale=1.0))


@functools.lru_cache(maxsize=16)
def _layers(folder: Path, version: str, lora: LoraFile) -> LoraLayers:
    pipeline = _weightless_pipeline(folder)
    load_adapter(pipeline, lora, LoraLayers.ADAPTER)
    logger.info("read LoRA %s (%s)", lora.path.name, ", ".join(lora.targets))
    return LoraLayers(pipeline, lora.targets)


def _weightless_pipeline(folder: Path):
    """The diffusers pipeline of ``folder``'s model with a UNet and text encoders whose weights hold no memory
    (made on the meta device, then each tensor a zero broadcast to its shape): their structure is what diffusers'
    LoRA loader needs to place a LoRA's layers. (Left on the meta device, PEFT would move the LoRA's own tensors
    there too.)"""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    parts: dict[str, Any] = {"vae": None, "tokenizer": None, "tokenizer_2": None, "scheduler": None}
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notes on initializing meta tensors
        parts["unet"] = diffusers.UNet2DConditionModel.from_config(
            diffusers.UNet2DConditionModel.load_config(folder / "unet")
        )
        for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            if (folder / name / "config.json").is_file():
                parts[name] = cls(CLIPTextConfig.from_pretrained(folder / name))
            elif name in index:
                parts[name] = None
    for model in parts.values():
        if isinstance(model, torch.nn.Module):
            _hollow(model)
    cls = getattr(diffusers, index["_class_name"])
    accepted = set(inspect.signature(cls.__init__).parameters)
    return cls(**{name: value for name, value in parts.items() if name in accepted})


def _hollow(model) -> None:
    """Give each parameter and buffer of ``model`` (on the meta device) a CPU value of its shape that takes no
    memory: one zero, broadcast."""
    import torch

    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, value in table.items():
                if value is not None:
                    hollow = torch.zeros((), dtype=value.dtype).expand(value.shape)
                    table[name] = (
                        torch.nn.Parameter(hollow, requires_grad=False) if table is module._parameters else hollow
                    )
