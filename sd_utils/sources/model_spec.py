"""Model facts read once from a diffusers SDXL folder, and the ONNX IO contract of every submodel.

Nothing about SDXL's sizes is typed here: widths, text length, latent channels, VAE factors and the width of
``time_ids`` (6 for the base, 5 for the refiner) come from the checkpoint's ``config.json`` files. Olive's
``io_config`` and dummy inputs (through ``user_script.py``) and ONNX Runtime's free-dimension overrides are all
generated from one :class:`SubmodelIO` per submodel, so the names cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from sd_utils.errors import ModelNotFoundError

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
SUBMODELS = ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder")
# which diffusers component holds each ONNX submodel's weights and config.json
COMPONENT_OF = {
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",
    "unet": "unet",
    "unet_controlnet": "unet",  # the UNet that takes ControlNet residuals (ControlNet runs only)
    "unet_refresh": "unet",  # the UNet that also outputs DeepCache's feature (--cache_interval runs only)
    "unet_shallow": "unet",  # the UNet's outer blocks on that cached feature (--cache_interval runs only)
    "controlnet": "controlnet",
    "vae_encoder": "vae",
    "vae_decoder": "vae",
}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelNotFoundError(
            f"{path.parent.parent} is missing {path.parent.name}/{path.name}; "
            "point --model_id at a complete diffusers SDXL folder"
        ) from None
    except ValueError as error:  # json.JSONDecodeError, UnicodeDecodeError
        raise ModelNotFoundError(f"{path} is not valid JSON ({error}); restore the file or the model folder") from None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the pipeline needs to know about one SDXL checkpoint (base or refiner)."""

    root: Path
    pipeline_class: str
    submodels: tuple[str, ...]
    latent_channels: int
    unet_in_channels: int  # latent_channels, or 2 x latent_channels + 1 for an inpainting UNet (+ mask, masked image)
    vae_scale_factor: int
    unet_downscale: int
    attention_channels: tuple[int, ...]  # channel width of every UNet block with transformer layers
    group_norm_sizes: dict[str, tuple[int, ...]]  # channels per GroupNorm group: {"unet": ..., "vae": ...}
    scaling_factor: float
    text_length: int
    text_hidden_sizes: dict[str, int]
    text_num_layers: dict[str, int]
    pooled_dim: int
    cross_attention_dim: int
    time_ids_width: int
    requires_aesthetics_score: bool
    default_image_size: int
    has_safety_checker: bool
    # what a ControlNet adds to the UNet: (channels, downscale as a power of 2) of each down-block residual, then the
    # mid block's (diffusers' ControlNetModel: conv_in, each resnet of each down block, each downsampler)
    control_residuals: tuple[tuple[int, int], ...] = ()
    # DeepCache (--cache_interval): channels of the feature it caches (the input of the UNet's last up block), and
    # whether the blocks around it (first down block, last up block) read the text through cross-attention
    cache_channels: int = 0
    shallow_cross_attention: bool = False

    @property
    def is_refiner(self) -> bool:
        return "text_encoder" not in self.submodels

    @property
    def is_inpainting(self) -> bool:
        """An inpainting UNet: it takes the mask and the masked image's latents beside the latents (9 channels)."""
        return self.unet_in_channels != self.latent_channels

    @property
    def scheduler_config(self) -> dict[str, Any]:
        """The folder's ``scheduler/scheduler_config.json`` (``_class_name`` included)."""
        return _read_json(self.root / "scheduler" / "scheduler_config.json")

    @property
    def size_multiple(self) -> int:
        """Image sizes must be multiples of this: the VAE's factor times the UNet's total downsampling (the UNet
        export assumes latents divisible by its down factor, see ``UNet2DConditionModel.forward_upsample_size``)."""
        return self.vae_scale_factor * self.unet_downscale

    @classmethod
    def from_folder(cls, root: Path) -> ModelSpec:
        root = Path(root)
        index = _read_json(root / "model_index.json")
        present = {key for key, value in index.items() if isinstance(value, list) and value[0] is not None}
        for required in ("unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler"):
            if required not in present:
                raise ModelNotFoundError(
                    f"{root} has no '{required}' component in model_index.json; "
                    "point --model_id at an SDXL base or refiner folder"
                )
        unet = _read_json(root / "unet" / "config.json")
        vae = _read_json(root / "vae" / "config.json")
        text_configs = {name: _read_json(root / name / "config.json") for name in TEXT_ENCODERS if name in present}
        tokenizer_2 = _read_json(root / "tokenizer_2" / "tokenizer_config.json")
        pooled_dim = text_configs["text_encoder_2"]["projection_dim"]
        if unet.get("addition_embed_type") != "text_time":
            raise ModelNotFoundError(
                f"{root}/unet has addition_embed_type={unet.get('addition_embed_type')!r}, not 'text_time'; "
                "this is not an SDXL UNet"
            )
        time_ids_width, remainder = divmod(
            unet["projection_class_embeddings_input_dim"] - pooled_dim, unet["addition_time_embed_dim"]
        )
        if remainder:
            raise ModelNotFoundError(f"{root}/unet config does not fit a pooled embedding of width {pooled_dim}")
        vae_blocks = vae.get("block_out_channels") or vae["decoder_block_out_channels"]  # AutoencoderTiny's
        vae_scale_factor = 2 ** (len(vae_blocks) - 1)
        has_text_encoder = "text_encoder" in present
        submodels = tuple(name for name in SUBMODELS if name != "text_encoder" or has_text_encoder)
        return cls(
            root=root,
            pipeline_class=index["_class_name"],
            submodels=submodels,
            latent_channels=vae["latent_channels"],
            unet_in_channels=unet.get("in_channels", vae["latent_channels"]),
            vae_scale_factor=vae_scale_factor,
            unet_downscale=2 ** (len(unet["block_out_channels"]) - 1),
            group_norm_sizes={
                "unet": tuple(sorted({c // unet["norm_num_groups"] for c in unet["block_out_channels"]})),
                "vae": tuple(sorted({c // vae["norm_num_groups"] for c in vae_blocks}))
                if "norm_num_groups" in vae
                else (),
            },
            attention_channels=tuple(
                sorted(
                    {
                        channels
                        for kind, channels in zip(unet["down_block_types"], unet["block_out_channels"], strict=True)
                        if "CrossAttn" in kind
                    }
                )
            ),
            scaling_factor=vae["scaling_factor"],
            text_length=min(
                tokenizer_2.get("model_max_length", 77),
                text_configs["text_encoder_2"].get("max_position_embeddings", 77),
            ),
            text_hidden_sizes={name: config["hidden_size"] for name, config in text_configs.items()},
            text_num_layers={name: config["num_hidden_layers"] for name, config in text_configs.items()},
            pooled_dim=pooled_dim,
            cross_attention_dim=unet["cross_attention_dim"],
            time_ids_width=time_ids_width,
            requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)),
            default_image_size=unet["sample_size"] * vae_scale_factor,
            has_safety_checker="safety_checker" in present,
            control_residuals=control_residuals(unet),
            cache_channels=cache_channels(unet),
            shallow_cross_attention="CrossAttn" in unet["down_block_types"][0] + unet["up_block_types"][-1],
        )


@dataclasses.dataclass(frozen=True)
class Shape:
    """The shapes one pipeline call runs at: images per call (before CFG doubling) and image size in pixels."""

    batch: int
    height: int
    width: int
    classifier_free_guidance: bool = True
    text_chunks: int = 1  # prompt chunks of 77 tokens (long prompts, BREAK): the UNet's text sequence is 77 x this
    free_batch: bool = False  # the UNet (and ControlNets) meet both batch sizes, with and without CFG (--cfg_cutoff)


@dataclasses.dataclass(frozen=True)
class SubmodelIO:
    """ONNX names and symbolic dims of one submodel. Dims are prefixed with the submodel name (``unet_sample_batch``)
    so one ORT ``SessionOptions`` can pin the dims of every submodel by name."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    dim_values_for: Any  # Callable[[Shape], dict[str, int]]: the value of every symbolic input dim at ``shape``
    dummy_shapes_for: Any  # Callable[[Shape], dict[str, tuple[int, ...]]]: the input shapes at ``shape``
    input_dtypes: dict[str, str]

    def olive_io_config(self) -> dict[str, Any]:
        return {
            "input_names": list(self.input_names),
            "output_names": list(self.output_names),
            "dynamic_axes": {name: dict(axes) for name, axes in self.dynamic_axes.items()},
        }

    def dim_values(self, shape: Shape) -> dict[str, int]:
        return self.dim_values_for(shape)

    def dummy_inputs(self, shape: Shape) -> tuple[Any, ...]:
        """Export inputs (torch tensors, in ``input_names`` order) at ``shape``."""
        import torch

        shapes = self.dummy_shapes_for(shape)
        generator = torch.Generator().manual_seed(0)
        tensors = []
        for name in self.input_names:
            if self.input_dtypes[name] == "int64":
                tensors.append(torch.randint(0, 1000, shapes[name], dtype=torch.int64, generator=generator))
            else:
                tensors.append(torch.rand(shapes[name], generator=generator) * (999.0 if name == "timestep" else 1.0))
        return tuple(tensors)


def control_residuals(unet: dict[str, Any]) -> tuple[tuple[int, int], ...]:
    """(channels, downscale exponent) of each residual a ControlNet adds to a UNet with config ``unet``: the down
    blocks' in order, the mid block's last."""
    channels = unet["block_out_channels"]
    layers = unet["layers_per_block"]
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    found = [(channels[0], 0)]
    for level, width in enumerate(channels):
        found += [(width, level)] * layers[level]
        if level < len(channels) - 1:  # every down block but the last has a downsampler
            found.append((width, level + 1))
    return (*found, (channels[-1], len(channels) - 1))


def cache_channels(unet: dict[str, Any]) -> int:
    """Channels of the input of the last up block of a UNet with config ``unet`` (diffusers' UNet2DConditionModel:
    the previous up block's output, ``block_out_channels[1]``; the mid block's with one level)."""
    channels = unet["block_out_channels"]
    return channels[1] if len(channels) > 1 else channels[0]


def control_io_names(spec: ModelSpec) -> tuple[tuple[str, ...], str]:
    """The ONNX names of the ControlNet residuals: the down blocks', then the mid block's."""
    return tuple(f"down_residual_{index}" for index in range(len(spec.control_residuals) - 1)), "mid_residual"


def residual_shapes(spec: ModelSpec, sample_shape) -> list[tuple[int, ...]]:
    """The shapes of a ControlNet's residuals (down blocks', then mid block's) for a latent ``sample_shape``."""
    batch, _, height, width = sample_shape
    return [
        (batch, channels, -(-height // 2**level), -(-width // 2**level)) for channels, level in spec.control_residuals
    ]


def _residual_axes(spec: ModelSpec, prefix: str) -> tuple[dict[str, dict[int, str]], Any, Any]:
    """Dynamic axes of the residual tensors named ``prefix``_…, their dim values and their shapes at a shape."""
    down, mid = control_io_names(spec)
    names = (*down, mid)
    axes = {
        name: {0: f"{prefix}_batch", 2: f"{prefix}_height_{level}", 3: f"{prefix}_width_{level}"}
        for name, (_, level) in zip(names, spec.control_residuals, strict=True)
    }

    def latent(shape: Shape) -> tuple[int, int, int]:
        batch = shape.batch * (2 if shape.classifier_free_guidance else 1)
        return batch, shape.height // spec.vae_scale_factor, shape.width // spec.vae_scale_factor

    def dims(shape: Shape) -> dict[str, int]:
        batch, height, width = latent(shape)
        values = {f"{prefix}_batch": batch}
        for _, level in spec.control_residuals:
            values[f"{prefix}_height_{level}"] = -(-height // 2**level)
            values[f"{prefix}_width_{level}"] = -(-width // 2**level)
        return values

    def shapes(shape: Shape) -> dict[str, tuple[int, ...]]:
        batch, height, width = latent(shape)
        return dict(zip(names, residual_shapes(spec, (batch, spec.latent_channels, height, width)), strict=True))

    return axes, dims, shapes


def _controlled_unet_io(spec: ModelSpec) -> SubmodelIO:
    """The UNet that takes a ControlNet's residuals as inputs (built only for ControlNet runs)."""
    plain = _unet_io(spec)
    axes, dims, shapes = _residual_axes(spec, "unet_residual")
    names = tuple(axes)
    return SubmodelIO(
        name="unet_controlnet",
        input_names=(*plain.input_names, *names),
        output_names=plain.output_names,
        dynamic_axes={**plain.dynamic_axes, **axes},
        dim_values_for=lambda shape: {**plain.dim_values(shape), **dims(shape)},
        dummy_shapes_for=lambda shape: {**plain.dummy_shapes_for(shape), **shapes(shape)},
        input_dtypes={**plain.input_dtypes, **dict.fromkeys(names, "float32")},
    )


def _refresh_unet_io(spec: ModelSpec) -> SubmodelIO:
    """The UNet that also outputs the feature DeepCache keeps: the input of its last up block, at the latents'
    height and width (built only for --cache_interval runs)."""
    plain = _unet_io(spec)
    return dataclasses.replace(
        plain,
        name="unet_refresh",
        output_names=(*plain.output_names, "cache_feature"),
        dynamic_axes={**plain.dynamic_axes, "cache_feature": plain.dynamic_axes["sample"]},
    )


def _shallow_unet_io(spec: ModelSpec) -> SubmodelIO:
    """The UNet's outer blocks (conv_in, first down block, last up block, output) on a cached feature: the UNet's
    inputs (the text only where those blocks attend to it) and the feature, with the latents' batch and size."""
    plain = _unet_io(spec)
    inputs = [name for name in plain.input_names if name != "encoder_hidden_states" or spec.shallow_cross_attention]
    inputs.append("cache_feature")

    def shapes(shape: Shape) -> dict[str, tuple[int, ...]]:
        found = plain.dummy_shapes_for(shape)
        batch, _, height, width = found["sample"]
        return {**found, "cache_feature": (batch, spec.cache_channels, height, width)}

    axes = {**plain.dynamic_axes, "cache_feature": plain.dynamic_axes["sample"]}
    return SubmodelIO(
        name="unet_shallow",
        input_names=tuple(inputs),
        output_names=plain.output_names,
        dynamic_axes={name: value for name, value in axes.items() if name in inputs or name in plain.output_names},
        dim_values_for=lambda shape: {
            name: value
            for name, value in plain.dim_values(shape).items()
            if spec.shallow_cross_attention or not name.startswith("unet_hidden_")
        },
        dummy_shapes_for=shapes,
        input_dtypes={**plain.input_dtypes, "cache_feature": "float32"},
    )


def _controlnet_io(spec: ModelSpec) -> SubmodelIO:
    """A ControlNet: the UNet's inputs, the control image (pixels in [0, 1]) and its scale -> the residuals."""
    plain = _unet_io(spec)
    axes, dims, shapes = _residual_axes(spec, "controlnet_residual")
    image_axes = {0: "controlnet_cond_batch", 2: "controlnet_cond_height", 3: "controlnet_cond_width"}
    renamed = {
        name: {axis: dim.replace("unet_", "controlnet_") for axis, dim in value.items()}
        for name, value in plain.dynamic_axes.items()
        if name != "out_sample"
    }

    def dim_values(shape: Shape) -> dict[str, int]:
        values = {key.replace("unet_", "controlnet_"): value for key, value in plain.dim_values(shape).items()}
        batch = shape.batch * (2 if shape.classifier_free_guidance else 1)
        values.update(controlnet_cond_batch=batch, controlnet_cond_height=shape.height)
        values.update(controlnet_cond_width=shape.width, **dims(shape))
        return values

    def dummy_shapes(shape: Shape) -> dict[str, tuple[int, ...]]:
        batch = shape.batch * (2 if shape.classifier_free_guidance else 1)
        found = {**plain.dummy_shapes_for(shape), "controlnet_cond": (batch, 3, shape.height, shape.width)}
        return {**found, "conditioning_scale": ()}

    inputs = (*plain.input_names, "controlnet_cond", "conditioning_scale")
    return SubmodelIO(
        name="controlnet",
        input_names=inputs,
        output_names=tuple(axes),
        dynamic_axes={**renamed, "controlnet_cond": image_axes, **axes},
        dim_values_for=dim_values,
        dummy_shapes_for=lambda shape: {**dummy_shapes(shape), **shapes(shape)},
        input_dtypes=dict.fromkeys(inputs, "float32"),
    )


def _text_encoder_io(spec: ModelSpec, name: str) -> SubmodelIO:
    batch, sequence = f"{name}_batch", f"{name}_sequence"
    states = {0: batch, 1: sequence}
    # optimum's ORTTextEncoder maps outputs by name; SDXL reads hidden_states[-2] (penultimate layer) of both
    # encoders and the pooled projection ("text_embeds", first output, 2-D) of the second one.
    first = ("text_embeds", "last_hidden_state") if name == "text_encoder_2" else ("last_hidden_state", "pooler_output")
    hidden = tuple(f"hidden_states.{index}" for index in range(spec.text_num_layers[name] + 1))
    outputs = (*first, *hidden)
    axes = {"input_ids": states}
    for output in outputs:
        axes[output] = {0: batch} if output in ("text_embeds", "pooler_output") else states
    return SubmodelIO(
        name=name,
        input_names=("input_ids",),
        output_names=outputs,
        dynamic_axes=axes,
        dim_values_for=lambda shape: {batch: shape.batch, sequence: spec.text_length},
        dummy_shapes_for=lambda shape: {"input_ids": (shape.batch, spec.text_length)},
        input_dtypes={"input_ids": "int64"},
    )


def _unet_io(spec: ModelSpec) -> SubmodelIO:
    def latent_batch(shape: Shape) -> int:
        return shape.batch * (2 if shape.classifier_free_guidance else 1)

    def dims(shape: Shape) -> dict[str, int]:
        n = latent_batch(shape)
        return {
            "unet_sample_batch": n,
            "unet_sample_height": shape.height // spec.vae_scale_factor,
            "unet_sample_width": shape.width // spec.vae_scale_factor,
            "unet_hidden_batch": n,
            "unet_hidden_sequence": spec.text_length * shape.text_chunks,
            "unet_text_embeds_batch": n,
            "unet_time_ids_batch": n,
        }

    def shapes(shape: Shape) -> dict[str, tuple[int, ...]]:
        n = latent_batch(shape)
        h, w = shape.height // spec.vae_scale_factor, shape.width // spec.vae_scale_factor
        return {
            "sample": (n, spec.unet_in_channels, h, w),
            "timestep": (),
            "encoder_hidden_states": (n, spec.text_length, spec.cross_attention_dim),
            "text_embeds": (n, spec.pooled_dim),
            "time_ids": (n, spec.time_ids_width),
        }

    sample_axes = {0: "unet_sample_batch", 2: "unet_sample_height", 3: "unet_sample_width"}
    return SubmodelIO(
        name="unet",
        input_names=("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"),
        output_names=("out_sample",),
        dynamic_axes={
            "sample": sample_axes,
            "encoder_hidden_states": {0: "unet_hidden_batch", 1: "unet_hidden_sequence"},
            "text_embeds": {0: "unet_text_embeds_batch"},
            "time_ids": {0: "unet_time_ids_batch"},
            "out_sample": sample_axes,
        },
        dim_values_for=dims,
        dummy_shapes_for=shapes,
        input_dtypes=dict.fromkeys(
            ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"), "float32"
        ),
    )


# CUDA's cuDNN describes a tensor's extent with 32-bit integers: the VAE decoder's mid-block attention scores for n
# images, n x tokens² elements, must stay within it (at 1024², 16384 latent tokens: 7 images; bench/NOTES.md)
MAX_TENSOR_ELEMENTS = 2**31 - 1


def decoder_batch(spec: ModelSpec, shape: Shape) -> int:
    """Images the VAE decoder decodes at once for images of ``shape``: all of them, else the largest divisor of the
    batch whose attention scores fit :data:`MAX_TENSOR_ELEMENTS` (every slice the same shape: static dims)."""
    tokens = (shape.height // spec.vae_scale_factor) * (shape.width // spec.vae_scale_factor)
    fits = max(1, MAX_TENSOR_ELEMENTS // max(1, tokens) ** 2)
    return max(size for size in range(1, min(shape.batch, fits) + 1) if shape.batch % size == 0)


def _vae_io(spec: ModelSpec, name: str) -> SubmodelIO:
    batch, height, width = f"{name}_batch", f"{name}_height", f"{name}_width"
    encoder = name == "vae_encoder"
    input_name, output_name = ("sample", "latent_parameters") if encoder else ("latent_sample", "sample")
    # the encoder sees pixels, the decoder latents
    divisor = 1 if encoder else spec.vae_scale_factor
    channels = 3 if encoder else spec.latent_channels
    # diffusers' img2img encodes image by image when it gets one generator per image, as this tool always passes
    # (StableDiffusionXLImg2ImgPipeline.prepare_latents), so the encoder always runs at batch 1
    run_batch = (lambda shape: 1) if encoder else (lambda shape: decoder_batch(spec, shape))
    axes = {0: batch, 2: height, 3: width}
    out_axes = {0: batch, 2: f"{name}_out_height", 3: f"{name}_out_width"}
    return SubmodelIO(
        name=name,
        input_names=(input_name,),
        output_names=(output_name,),
        dynamic_axes={input_name: axes, output_name: out_axes},
        dim_values_for=lambda shape: {
            batch: run_batch(shape),
            height: shape.height // divisor,
            width: shape.width // divisor,
        },
        dummy_shapes_for=lambda shape: {
            input_name: (shape.batch, channels, shape.height // divisor, shape.width // divisor)
        },
        input_dtypes={input_name: "float32"},
    )


def submodel_io(spec: ModelSpec, name: str) -> SubmodelIO:
    """The IO contract of submodel ``name`` of ``spec``."""
    if name in TEXT_ENCODERS:
        return _text_encoder_io(spec, name)
    if name == "unet":
        return _unet_io(spec)
    if name in ("vae_encoder", "vae_decoder"):
        return _vae_io(spec, name)
    if name == "unet_controlnet":
        return _controlled_unet_io(spec)
    if name == "controlnet":
        return _controlnet_io(spec)
    if name == "unet_refresh":
        return _refresh_unet_io(spec)
    if name == "unet_shallow":
        return _shallow_unet_io(spec)
    raise ValueError(f"unknown submodel {name!r}; expected one of {', '.join(SUBMODELS)}")


def free_dimension_overrides(spec: ModelSpec, shape: Shape) -> dict[str, int]:
    """The value of every symbolic dim of every submodel at ``shape`` (ORT ``add_free_dimension_override_by_name``)."""
    overrides: dict[str, int] = {}
    for name in spec.submodels:
        overrides.update(submodel_io(spec, name).dim_values(shape))
    return overrides


def export_shape(spec: ModelSpec) -> Shape:
    """A small shape for ONNX export: every dim is symbolic, so the smallest size the UNet accepts is enough."""
    side = spec.size_multiple * 2
    return Shape(batch=1, height=side, width=side, classifier_free_guidance=True)
