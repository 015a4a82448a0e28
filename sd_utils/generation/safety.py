"""The optional safety checker: diffusers' classic ``StableDiffusionSafetyChecker`` and its CLIP image processor,
converted with Olive like every submodel and run with ONNX Runtime on each generated image.

SDXL ships without one; a checker comes from the model folder (a ``safety_checker`` component) or from
``--safety_checker ID|DIR``. Flagged images are never written; the generation loop regenerates them with fresh seeds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import torch

from sd_utils.errors import ModelNotFoundError
from sd_utils.optimize.olive_workflow import (
    external_data_files,
    load_template,
    olive_cache,
    replace_folder,
    run_submodel,
    staged,
    workflow_config,
)
from sd_utils.runtime.providers import Provider, check_session_provider, new_session, share_arena
from sd_utils.sources.models import download_snapshot

logger = logging.getLogger(__name__)

SUBMODEL = "safety_checker"
INPUT, OUTPUT = "clip_input", "has_nsfw_concepts"
TINY_CHECKER = "tiny-safety-checker"
CHECKER_ALLOW_PATTERNS = ["*.json", "*.safetensors"]


@dataclasses.dataclass(frozen=True)
class CheckerSource:
    """Where a checker's weights (``config.json`` + safetensors) and image processor config live."""

    name: str
    weights: Path
    processor: Path


class SafetyCheckerExport(torch.nn.Module):
    """``clip_input`` -> one flag per image. Reuses diffusers' ``forward_onnx`` maths (cosine distances to the concept
    embeddings against their thresholds) rather than copying it; the image-blanking output is not needed."""

    def __init__(self, checker: torch.nn.Module):
        super().__init__()
        self.checker = checker

    def forward(self, clip_input):
        return self.checker.forward_onnx(clip_input, clip_input.clone())[1]


def load_checker_module(model_path: str | Path) -> torch.nn.Module:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    checker = StableDiffusionSafetyChecker.from_pretrained(model_path, torch_dtype=torch.float32)
    checker.config.vision_config._attn_implementation = "eager"
    return SafetyCheckerExport(checker).eval()


def input_size(model_path: str | Path) -> int:
    return json.loads((Path(model_path) / "config.json").read_text())["vision_config"]["image_size"]


def olive_io_config(model_path: str | Path) -> dict:
    return {
        "input_names": [INPUT],
        "output_names": [OUTPUT],
        "dynamic_axes": {INPUT: {0: "safety_checker_batch"}, OUTPUT: {0: "safety_checker_batch"}},
    }


def dummy_inputs(model_path: str | Path) -> tuple[torch.Tensor]:
    size = input_size(model_path)
    return (torch.rand((1, 3, size, size), generator=torch.Generator().manual_seed(0)),)


def build_tiny_checker(
    destination: Path, *, threshold: float = 0.5, seed: int = 0, direction: torch.Tensor | None = None
) -> Path:
    """A toy-width checker that flags an image when the cosine similarity of its embedding with one direction (random,
    or ``direction``) exceeds ``threshold``: deterministic, so tests can choose which images get flagged."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(seed)
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "image_size": 32,
        "patch_size": 8,
    }
    text = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}
    checker = StableDiffusionSafetyChecker(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16))
    direction = torch.nn.functional.normalize(torch.randn(16) if direction is None else direction, dim=0)
    with torch.no_grad():
        checker.concept_embeds.copy_(direction.expand_as(checker.concept_embeds))
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(2.0)  # a cosine never exceeds 1: no special-care adjustment
    destination.mkdir(parents=True, exist_ok=True)
    checker.save_pretrained(destination, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(destination)
    return destination


def find_checker(
    option: str | None, *, model_root: Path, has_component: bool, models_dir: Path
) -> CheckerSource | None:
    """The checker to use: ``--safety_checker`` if given, else the model folder's own component, else none."""
    if option is None:
        if not has_component:
            return None
        return CheckerSource(model_root.name, model_root / "safety_checker", model_root / "feature_extractor")
    if option == TINY_CHECKER:
        folder = models_dir / "builtin" / TINY_CHECKER
        if not (folder / "config.json").is_file():
            build_tiny_checker(folder)
        return CheckerSource(TINY_CHECKER, folder, folder)
    path = Path(option).expanduser()
    if not path.is_dir() and option.count("/") == 1 and not option.startswith((".", "/", "~")):
        path = download_snapshot(
            option,
            allow_patterns=CHECKER_ALLOW_PATTERNS,
            option="--safety_checker",
            fix=f"pass a local checker folder or {TINY_CHECKER}",
        )
    if (path / "safety_checker" / "config.json").is_file():
        return CheckerSource(path.name, path / "safety_checker", path / "feature_extractor")
    if (path / "config.json").is_file() and (path / "preprocessor_config.json").is_file():
        return CheckerSource(path.name, path, path)
    raise ModelNotFoundError(
        f"--safety_checker {option!r} is not a safety checker folder (config.json + preprocessor_config.json, or a "
        f"pipeline with safety_checker/ and feature_extractor/); give such a folder, a hub id, or {TINY_CHECKER}"
    )


def checker_folder(models_dir: Path, source: CheckerSource) -> Path:
    return models_dir / "optimized" / SUBMODEL / source.name


def optimize_checker(
    source: CheckerSource,
    *,
    provider: Provider,
    models_dir: Path,
    cache_dir: Path,
    clean_cache: bool = False,
    tempdir: Path | None = None,
) -> Path:
    """Convert and optimize the checker with its Olive workflow into ``models/optimized/safety_checker/<name>``;
    ``clean_cache`` as for the models (``olive_workflow.olive_cache``)."""
    destination = checker_folder(models_dir, source)
    with olive_cache(cache_dir, clean=clean_cache), staged(models_dir, "checker-") as staging:
        logger.info("safety checker %s: convert -> %s", source.name, provider.optimize_pass)
        config = workflow_config(
            load_template(SUBMODEL),
            submodel=SUBMODEL,
            provider=provider,
            model_path=source.weights,
            cache_dir=cache_dir,
            output_dir=staging / "olive",
        )
        _, optimized = run_submodel(config, submodel=SUBMODEL, tempdir=tempdir)
        folder = staging / "checker"
        folder.mkdir()
        shutil.copy2(optimized, folder / "model.onnx")
        for name in external_data_files(optimized):
            shutil.copy2(optimized.parent / name, folder / name)
        shutil.copy2(source.weights / "config.json", folder / "config.json")
        shutil.copy2(source.processor / "preprocessor_config.json", folder / "preprocessor_config.json")
        (folder / "sdxl_olive.json").write_text(json.dumps({"provider": provider.name, "source": str(source.weights)}))
        replace_folder(folder, destination)
        return destination


class OnnxSafetyChecker:
    """Flags images with the ONNX checker: ``checker(images) -> [True if flagged, ...]``."""

    def __init__(self, folder: Path, *, provider: Provider, device_id: int = 0):
        from transformers import CLIPImageProcessor

        share_arena(provider, device_id)
        self.session = new_session(str(folder / "model.onnx"), provider, device_id)
        check_session_provider(self.session, provider, str(folder))
        self.processor = CLIPImageProcessor.from_pretrained(folder)
        self.dtype = "float16" if self.session.get_inputs()[0].type == "tensor(float16)" else "float32"

    def __call__(self, images: list) -> list[bool]:
        pixels = self.processor(images=images, return_tensors="np").pixel_values.astype(self.dtype)
        (flags,) = self.session.run([OUTPUT], {INPUT: pixels})
        return [bool(flag) for flag in flags]


def image_embeddings(checker_dir: Path, images: list) -> torch.Tensor:
    """The checker's image embeddings (PyTorch, for tests and threshold tuning)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    checker = StableDiffusionSafetyChecker.from_pretrained(checker_dir).eval()
    pixels = CLIPImageProcessor.from_pretrained(checker_dir)(images=images, return_tensors="pt").pixel_values
    with torch.no_grad():
        return checker.visual_projection(checker.vision_model(pixels)[1])
