"""Build SDXL-architecture pipelines locally: no hub, deterministic random weights, real CLIP tokenizers.

Two sizes of each variant (base, refiner):

* ``tiny`` / ``tiny-refiner``: the real diffusers/transformers classes at toy width, so the whole optimize + generate
  flow takes seconds on a laptop CPU. Tests and the offline demo use them.
* ``random-sdxl-base`` / ``random-sdxl-refiner``: the published SDXL 1.0 component configs with random weights, for
  speed and memory benchmarks.

The configs below are the public facts of stabilityai/stable-diffusion-xl-{base,refiner}-1.0 (their
``*/config.json``); the tiny ones keep every structural switch (``text_time`` conditioning, linear projections,
scheduler, padding tokens) and shrink only widths and depths.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sd_utils.files import follow_umask, replace_folder
from sd_utils.sources.tokenizers import save_sdxl_tokenizers

logger = logging.getLogger(__name__)

# stabilityai/stable-diffusion-xl-base-1.0/scheduler/scheduler_config.json, less the keys Euler ignores
SDXL_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}
# the keys of that file Euler ignores but other samplers read (--scheduler ddim, ...): written into the built folders'
# scheduler_config.json as the real file has them (DDIM would otherwise clip its x0 estimate to [-1, 1])
SDXL_SCHEDULER_OTHER_KEYS = {
    "clip_sample": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
}


def folder_format(arch: Architecture) -> str:
    """A digest of everything a built folder of ``arch`` is made from besides shipped weights (configs, scheduler):
    a folder built by an older version of this code is rebuilt."""
    import hashlib

    made_from = repr((arch, SDXL_SCHEDULER, SDXL_SCHEDULER_OTHER_KEYS))
    return hashlib.sha256(made_from.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class TextEncoderSize:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    hidden_act: str

    def config(self) -> dict[str, Any]:
        # bos/eos/pad ids as in the real SDXL text encoder configs: eos_token_id 2 selects the "argmax of input_ids"
        # pooling, which finds <|endoftext|> (the largest id) whatever the pad token is.
        return {
            **dataclasses.asdict(self),
            "projection_dim": self.hidden_size,
            "vocab_size": 49408,
            "max_position_embeddings": 77,
            "layer_norm_eps": 1e-5,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "pad_token_id": 1,
        }


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Everything needed to instantiate one SDXL-family pipeline; ``unet`` and ``vae`` are diffusers configs."""

    name: str
    refiner: bool
    text_encoder: TextEncoderSize | None
    text_encoder_2: TextEncoderSize
    unet: dict[str, Any]
    vae: dict[str, Any]
    description: str
    # trained weights shipped with the project (sd_utils/demo_model/weights): <unet_weights>.safetensors + vae
    unet_weights: str | None = None

    @property
    def cross_attention_dim(self) -> int:
        first = self.text_encoder.hidden_size if self.text_encoder else 0
        return first + self.text_encoder_2.hidden_size


def _unet_config(
    *,
    blocks: list[str],
    block_out_channels: list[int],
    attention_head_dim: list[int],
    transformer_layers_per_block: list[int] | int,
    layers_per_block: int,
    addition_time_embed_dim: int,
    time_ids_width: int,
    cross_attention_dim: int,
    pooled_dim: int,
    norm_num_groups: int,
    sample_size: int,
) -> dict[str, Any]:
    down = ["CrossAttnDownBlock2D" if kind == "attn" else "DownBlock2D" for kind in blocks]
    up = ["CrossAttnUpBlock2D" if kind == "attn" else "UpBlock2D" for kind in reversed(blocks)]
    return {
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": block_out_channels,
        "layers_per_block": layers_per_block,
        "attention_head_dim": attention_head_dim,
        "transformer_layers_per_block": transformer_layers_per_block,
        "cross_attention_dim": cross_attention_dim,
        "norm_num_groups": norm_num_groups,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": addition_time_embed_dim,
        # the added embedding sees the pooled text embedding and one sinusoidal embedding per time id
        "projection_class_embeddings_input_dim": time_ids_width * addition_time_embed_dim + pooled_dim,
    }


def _vae_config(*, block_out_channels: list[int], layers_per_block: int, norm_num_groups: int, sample_size: int):
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * len(block_out_channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(block_out_channels),
        "block_out_channels": block_out_channels,
        "layers_per_block": layers_per_block,
        "latent_channels": 4,
        "norm_num_groups": norm_num_groups,
        "sample_size": sample_size,
        "scaling_factor": 0.13025,
        "force_upcast": True,
    }


_TINY_TE = TextEncoderSize(32, 64, 4, 3, "quick_gelu")
_TINY_TE2 = TextEncoderSize(32, 64, 4, 3, "gelu")
_TINY_VAE = _vae_config(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=8, sample_size=128)
_DEMO_VAE = _vae_config(block_out_channels=[16, 32, 32], layers_per_block=1, norm_num_groups=8, sample_size=64)
_DEMO_UNET = {
    "blocks": ["plain", "attn", "attn"],
    "block_out_channels": [32, 64, 64],
    "attention_head_dim": [2, 4, 4],
    "transformer_layers_per_block": 1,
    "layers_per_block": 1,
    "addition_time_embed_dim": 8,
    "norm_num_groups": 16,
    "sample_size": 16,
}
_REAL_TE = TextEncoderSize(768, 3072, 12, 12, "quick_gelu")
_REAL_TE2 = TextEncoderSize(1280, 5120, 20, 32, "gelu")
_REAL_VAE = _vae_config(
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32, sample_size=1024
)

ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture(
            name="tiny",
            refiner=False,
            text_encoder=_TINY_TE,
            text_encoder_2=_TINY_TE2,
            unet=_unet_config(
                blocks=["plain", "attn"],
                block_out_channels=[32, 64],
                attention_head_dim=[2, 4],
                transformer_layers_per_block=[1, 2],
                layers_per_block=1,
                addition_time_embed_dim=8,
                time_ids_width=6,
                cross_attention_dim=_TINY_TE.hidden_size + _TINY_TE2.hidden_size,
                pooled_dim=_TINY_TE2.hidden_size,
                norm_num_groups=16,
                sample_size=16,
            ),
            vae=_TINY_VAE,
            description="tiny SDXL base (toy width, random weights) for tests and the offline demo",
        ),
        Architecture(
            name="tiny-refiner",
            refiner=True,
            text_encoder=None,
            text_encoder_2=_TINY_TE2,
            unet=_unet_config(
                blocks=["plain", "attn", "plain"],
                block_out_channels=[32, 64, 64],
                attention_head_dim=[2, 4, 4],
                transformer_layers_per_block=1,
                layers_per_block=1,
                addition_time_embed_dim=8,
                time_ids_width=5,
                cross_attention_dim=_TINY_TE2.hidden_size,
                pooled_dim=_TINY_TE2.hidden_size,
                norm_num_groups=16,
                sample_size=16,
            ),
            vae=_TINY_VAE,
            description="tiny SDXL refiner (toy width, random weights) for tests",
        ),
        Architecture(
            name="demo",
            refiner=False,
            text_encoder=_TINY_TE,
            text_encoder_2=_TINY_TE2,
            unet=_unet_config(
                **_DEMO_UNET,
                time_ids_width=6,
                cross_attention_dim=_TINY_TE.hidden_size + _TINY_TE2.hidden_size,
                pooled_dim=_TINY_TE2.hidden_size,
            ),
            vae=_DEMO_VAE,
            description="trained toy SDXL base that draws coloured shapes (sd_utils/demo_model)",
            unet_weights="unet",
        ),
        Architecture(
            name="demo-refiner",
            refiner=True,
            text_encoder=None,
            text_encoder_2=_TINY_TE2,
            unet=_unet_config(
                **_DEMO_UNET,
                time_ids_width=5,
                cross_attention_dim=_TINY_TE2.hidden_size,
                pooled_dim=_TINY_TE2.hidden_size,
            ),
            vae=_DEMO_VAE,
            description="trained toy SDXL refiner for the demo model (sd_utils/demo_model)",
            unet_weights="refiner_unet",
        ),
        Architecture(
            name="random-sdxl-base",
            refiner=False,
            text_encoder=_REAL_TE,
            text_encoder_2=_REAL_TE2,
            unet=_unet_config(
                blocks=["plain", "attn", "attn"],
                block_out_channels=[320, 640, 1280],
                attention_head_dim=[5, 10, 20],
                transformer_layers_per_block=[1, 2, 10],
                layers_per_block=2,
                addition_time_embed_dim=256,
                time_ids_width=6,
                cross_attention_dim=2048,
                pooled_dim=1280,
                norm_num_groups=32,
                sample_size=128,
            ),
            vae=_REAL_VAE,
            description="full-size SDXL 1.0 base architecture with random weights, for benchmarks",
        ),
        Architecture(
            name="random-sdxl-refiner",
            refiner=True,
            text_encoder=None,
            text_encoder_2=_REAL_TE2,
            unet=_unet_config(
                blocks=["plain", "attn", "attn", "plain"],
                block_out_channels=[384, 768, 1536, 1536],
                attention_head_dim=[6, 12, 24, 24],
                transformer_layers_per_block=4,
                layers_per_block=2,
                addition_time_embed_dim=256,
                time_ids_width=5,
                cross_attention_dim=1280,
                pooled_dim=1280,
                norm_num_groups=32,
                sample_size=128,
            ),
            vae=_REAL_VAE,
            description="full-size SDXL 1.0 refiner architecture with random weights, for benchmarks",
        ),
    )
}


def build_pipeline(arch: Architecture, *, seed: int = 0, trained: bool = True):
    """Instantiate the diffusers SDXL pipeline of ``arch`` with deterministic random weights (fp32, CPU); with
    ``trained``, the UNet and VAE of an architecture that ships trained weights get them."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # one seed per component, so changing one component's size does not change the others' weights
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**arch.unet)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**arch.vae)
    torch.manual_seed(seed + 2)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**arch.text_encoder_2.config()))
    text_encoder = None
    if arch.text_encoder is not None:
        torch.manual_seed(seed + 3)
        text_encoder = CLIPTextModel(CLIPTextConfig(**arch.text_encoder.config()))
    if trained and arch.unet_weights:
        _load_trained(unet, vae, arch.unet_weights)
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    common = {"unet": unet, "vae": vae, "text_encoder_2": text_encoder_2, "scheduler": scheduler}
    if arch.refiner:
        return StableDiffusionXLImg2ImgPipeline(
            text_encoder=None,
            tokenizer=None,
            tokenizer_2=None,
            requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
            **common,
        )
    return StableDiffusionXLPipeline(text_encoder=text_encoder, tokenizer=None, tokenizer_2=None, **common)


DEMO_WEIGHTS = Path(__file__).resolve().parents[1] / "demo_model" / "weights"
# written into every built folder: which architecture, and which shipped weights it holds
BUILD_RECORD = "sdxl_olive_builtin.json"


def weights_fingerprint(arch: Architecture) -> str | None:
    """A digest of the trained weights ``arch`` ships (None for random weights): a build made from older weights,
    e.g. before an update of the project, is out of date when it differs."""
    import hashlib

    if not arch.unet_weights:
        return None
    digest = hashlib.sha256()
    for name in (f"{arch.unet_weights}.safetensors", "vae.safetensors", "settings.json"):
        digest.update((DEMO_WEIGHTS / name).read_bytes())
    return digest.hexdigest()[:16]


def build_record(folder: Path) -> dict[str, Any]:
    """What :func:`materialize` recorded in ``folder`` ({} for any other diffusers folder)."""
    import json

    try:
        record = json.loads((Path(folder) / BUILD_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none, or damaged: then it is rebuilt
        return {}
    return record if isinstance(record, dict) else {}


def _load_trained(unet, vae, unet_weights: str) -> None:
    import json

    from safetensors.torch import load_file

    unet.load_state_dict({k: v.float() for k, v in load_file(DEMO_WEIGHTS / f"{unet_weights}.safetensors").items()})
    vae.load_state_dict({k: v.float() for k, v in load_file(DEMO_WEIGHTS / "vae.safetensors").items()})
    trained = json.loads((DEMO_WEIGHTS / "settings.json").read_text(encoding="utf-8"))
    vae.register_to_config(scaling_factor=trained["vae"]["scaling_factor"])


def materialize(arch: Architecture, destination: Path, *, seed: int = 0) -> Path:
    """Write ``arch`` as a diffusers folder at ``destination`` (atomically: built beside it, then renamed).

    Same code + same seed give the same files, byte for byte. Full-size weights are stored in fp16 to halve the
    download-free footprint; loaders upcast to fp32 before export.
    """
    import json

    import torch

    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}-{os.getpid()}-", dir=destination.parent))
    follow_umask(staging)
    try:
        logger.info("building the %s pipeline (%s)", arch.name, arch.description)
        pipeline = build_pipeline(arch, seed=seed)
        if arch.name.startswith("random-"):
            pipeline.to(torch.float16)
        pipeline.save_pretrained(staging, safe_serialization=True)
        _finish_folder(staging, refiner=arch.refiner)
        record = {"architecture": arch.name, "weights": weights_fingerprint(arch), "format": folder_format(arch)}
        (staging / BUILD_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        replace_folder(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


def _finish_folder(folder: Path, *, refiner: bool) -> None:
    """What a saved pipeline lacks: the tokenizers, and the scheduler keys Euler ignores (see above)."""
    import json

    save_sdxl_tokenizers(folder, names=("tokenizer_2",) if refiner else ("tokenizer", "tokenizer_2"))
    _register_tokenizers(folder, refiner=refiner)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **SDXL_SCHEDULER_OTHER_KEYS}, indent=2) + "\n")


def write_configs(arch: Architecture, destination: Path, *, inpainting: bool = False) -> Path:
    """Write ``arch`` as a diffusers folder of configs and tokenizers only, no weights: what diffusers'
    ``from_single_file(config=...)`` needs to convert a checkpoint of this architecture without the hub.
    ``inpainting``: the UNet takes the mask and the masked image's latents too (SDXL's inpainting checkpoints)."""
    from accelerate import init_empty_weights

    destination = Path(destination)
    if inpainting:
        latent = arch.vae["latent_channels"]
        arch = dataclasses.replace(arch, unet={**arch.unet, "in_channels": 2 * latent + 1})
    with init_empty_weights():  # the modules only serve their configs: no weights are allocated
        pipeline = build_pipeline(arch, trained=False)
    destination.mkdir(parents=True, exist_ok=True)
    pipeline.save_config(destination)
    for name, component in pipeline.components.items():
        if component is None:
            continue
        config = getattr(component, "config", None)
        if hasattr(config, "save_pretrained"):  # transformers' configs
            config.save_pretrained(destination / name)
        else:
            component.save_config(destination / name)
    _finish_folder(destination, refiner=arch.refiner)
    if inpainting:
        import json

        index = json.loads((destination / "model_index.json").read_text())
        index["_class_name"] = "StableDiffusionXLInpaintPipeline"
        (destination / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return destination


def _register_tokenizers(folder: Path, *, refiner: bool) -> None:
    """The pipeline was saved without tokenizers (they are written separately): list them in model_index.json."""
    import json

    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
    index["tokenizer"] = [None, None] if refiner else ["transformers", "CLIPTokenizer"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
