"""Command-line options: argparse definitions, one frozen :class:`Options`, and the checks that need no model."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import re
import sys
from pathlib import Path

from sd_utils.errors import UserInputError
from sd_utils.generation.control_images import PREPROCESSORS
from sd_utils.generation.schedulers import SAMPLERS, TIMESTEP_SPACINGS
from sd_utils.runtime.providers import PROVIDER_CHOICES
from sd_utils.sources.models import BUILTIN_MODELS, DEFAULT_FP16_VAE

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_ID = "stabilityai/stable-diffusion-xl-base-1.0"
MAX_SEED = 2**32 - 1

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything one invocation asked for, validated; library code takes this or keyword arguments."""

    model_id: str
    config: str | None
    variant: str | None
    lora: tuple[tuple[Path, float], ...]
    lora_dir: tuple[Path, ...]
    fuse_loras: bool
    controlnet: tuple[tuple[str, float], ...]
    control_image: tuple[Path, ...]
    control_preprocess: str
    canny_low: int
    canny_high: int
    control_start: float
    control_end: float
    embedding: tuple[Path, ...]
    embedding_dir: tuple[Path, ...]
    unet: Path | None
    provider: str
    device_id: int
    models_dir: Path
    cache_dir: Path
    tempdir: Path | None
    optimize: bool
    clean_cache: bool
    test_unoptimized: bool
    dynamic_dims: bool
    vae_tiling: bool
    low_vram: bool
    list_builds: bool
    delete_build: str | None
    prompt: str | None
    from_png: Path | None
    negative_prompt: str | None
    num_images: int
    batch_size: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: str | None
    timestep_spacing: str | None
    disable_classifier_free_guidance: bool
    cfg_cutoff: float
    cache_interval: int
    seed: int | None
    image_size: int | None
    width: int | None
    height: int | None
    output_dir: Path
    base_images: tuple[Path, ...]
    mask_image: tuple[Path, ...]
    strength: float | None
    aesthetic_score: float
    negative_aesthetic_score: float
    refiner_model_id: str | None
    refiner_config: str | None
    high_noise_frac: float
    interactive: bool
    prompts_file: Path | None
    ray: str | None
    workers: int | None
    safety_checker: str | None
    max_safety_retries: int
    use_fp16_fixed_vae: str | None
    serve: bool
    host: str
    port: int
    api_auth: str | None
    serve_model: tuple[str, ...]
    debug: bool

    @property
    def generates(self) -> bool:
        """A run of the CLI: generate from ``--prompt`` or ``--prompts_file`` (the window generates on demand)."""
        return (self.prompt is not None or self.prompts_file is not None) and not self.interactive

    @property
    def runs_inference(self) -> bool:
        return self.generates or self.interactive or self.serve

    def image_size_for(self, default_size: int) -> tuple[int, int]:
        """(width, height): ``--width``/``--height`` win over ``--image_size``, which wins over the model default."""
        side = self.image_size or default_size
        return self.width or side, self.height or side


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # one line and the usual exit code, like every other error of the tool (argparse prints usage + exits)
        raise UserInputError(f"{message} (see --help)")


def _in_range(convert, minimum, expected: str, maximum=math.inf):
    """An argparse ``type`` that converts with ``convert`` and rejects values outside [``minimum``, ``maximum``],
    nan and infinities (a guidance scale of 1e308 or an aesthetic score of nan can only give black images)."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not (math.isfinite(value) and minimum <= value <= maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return parse


_positive_int = _in_range(int, 1, "a positive integer")
_non_negative_int = _in_range(int, 0, "an integer >= 0")
# classifier-free guidance: SDXL uses 5-9, distilled models 0-2; far past 30 the images saturate to black or white
_guidance = _in_range(float, 0, "a guidance scale from 0 to 100", maximum=100)
# the LAION aesthetic scores the refiner was conditioned on run from 1 to 10
_aesthetic = _in_range(float, 0, "an aesthetic score from 0 to 10", maximum=10)
_fraction = _in_range(float, 0, "a fraction from 0 to 1", maximum=1)


def _lora(text: str) -> tuple[Path, float]:
    """``FILE[:SCALE]``: the scale is what follows the last colon when it is a number; when it is not, the text is a
    path if it names a file or the part after the colon looks like one (``C:\\x.safetensors``), else an error."""
    return _with_scale(text, "LoRA")


def _controlnet(text: str) -> tuple[str, float]:
    """``DIR|ID|FILE[:SCALE]``, read as :func:`_lora` reads ``FILE[:SCALE]`` (a hub id stays text)."""
    path, scale = _with_scale(text, "ControlNet")
    return str(path), scale


def _with_scale(text: str, what: str) -> tuple[Path, float]:
    path, _, scale = text.rpartition(":")
    if not path or Path(text).expanduser().exists():
        return Path(text), 1.0
    try:
        value = float(scale)
    except ValueError:
        if any(char in scale for char in "/\\."):
            return Path(text), 1.0
        raise argparse.ArgumentTypeError(
            f"{text}: scale {scale!r} is not a number; write FILE:0.8 (or FILE alone for 1.0)"
        ) from None
    if not (math.isfinite(value) and -10 <= value <= 10):
        raise argparse.ArgumentTypeError(f"expected a {what} scale from -10 to 10 after the colon, got {scale}")
    return Path(path), value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="stable_diffusion_xl.py",
        description="Optimize Stable Diffusion XL with Olive and generate images with ONNX Runtime.",
        epilog=f"Built-in models (created locally, no download): {', '.join(BUILTIN_MODELS)}.",
    )
    _add_model_arguments(parser)
    _add_optimization_arguments(parser)
    _add_generation_arguments(parser)
    _add_refiner_arguments(parser)
    _add_control_arguments(parser)
    _add_safety_arguments(parser)
    parser.add_argument(
        "--interactive",
        action="store_true",
        help="open a window: prompt box, Generate button, progress bar and up to 9 images; uses "
        "the same generation options (seed, guidance, size, batch) as the command line",
    )
    _add_sampler_arguments(parser)
    _add_job_arguments(parser)
    _add_serve_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    return parser


def _add_control_arguments(parser: argparse.ArgumentParser) -> None:
    control = parser.add_argument_group("ControlNet (composition from edge maps, depth maps, poses)")
    control.add_argument(
        "--controlnet",
        type=_controlnet,
        action="append",
        default=[],
        metavar="DIR|ID|FILE[:SCALE]",
        help="an SDXL ControlNet (diffusers folder, hub id, or its .safetensors in diffusers' layout) at SCALE "
        "(default 1.0); repeat for several, each with its --control_image. Optimized once, like the model. With "
        "--serve: the ControlNets requests may name (alwayson_scripts.controlnet), without --control_image",
    )
    control.add_argument(
        "--control_image",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="the control image of each --controlnet, in the same order (resized to the run's size)",
    )
    control.add_argument(
        "--control_preprocess",
        choices=PREPROCESSORS,
        default="none",
        help="make the control map from the image: canny (OpenCV's edges, see --canny_low/--canny_high), or none "
        "(default: the image is the map, e.g. a depth map or pose skeleton made elsewhere)",
    )
    control.add_argument("--canny_low", type=_non_negative_int, default=100, help="Canny's low threshold (100)")
    control.add_argument("--canny_high", type=_non_negative_int, default=200, help="Canny's high threshold (200)")
    control.add_argument(
        "--control_start",
        type=_fraction,
        default=0.0,
        help="fraction of the steps after which the ControlNets start to apply (default 0)",
    )
    control.add_argument(
        "--control_end",
        type=_fraction,
        default=1.0,
        help="fraction of the steps after which they stop applying (default 1)",
    )


def _add_lora_arguments(model) -> None:
    model.add_argument(
        "--lora",
        type=_lora,
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="a LoRA (.safetensors, diffusers/PEFT or kohya/A1111 keys) applied to --model_id's UNet and text "
        "encoders at SCALE (default 1.0), at run time: no new build, and no cost per step; repeat for several. "
        "Prompts can also ask for LoRAs with <lora:NAME:WEIGHT> (see --lora_dir)",
    )
    model.add_argument(
        "--lora_dir",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="a folder of LoRAs (subfolders too) that <lora:NAME:WEIGHT> tags in prompts name by file name without "
        ".safetensors; repeatable",
    )
    model.add_argument(
        "--fuse_loras",
        action="store_true",
        help="fuse the --lora files into the weights before export instead: a build of its own per LoRA set "
        "(minutes; the submodels a set does not touch are reused). For a LoRA used in every run, or one whose "
        "layers run-time LoRAs cannot reach",
    )


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model_id",
        default=DEFAULT_MODEL_ID,
        help="hub id, local diffusers folder, single-file SDXL checkpoint (.safetensors, as A1111/ComfyUI/Civitai "
        "have them; converted once into --models_dir), or built-in model name (default: %(default)s)",
    )
    model.add_argument(
        "--config",
        default=None,
        metavar="DIR|ID",
        help="for a single-file --model_id of other sizes than SDXL 1.0: the diffusers folder or hub id whose "
        "configs describe it (default: SDXL 1.0's base or refiner configs, written locally)",
    )
    model.add_argument(
        "--variant",
        default=None,
        metavar="NAME",
        help="which weight files of a hub --model_id to download: fp16 (half the size), fp32 (the plain files) "
        "or another variant the repository has (default: fp16 where the repository has it, else fp32)",
    )
    model.add_argument(
        "--unet",
        type=Path,
        default=None,
        metavar="FILE",
        help="a UNet in diffusers' layout (.safetensors) that replaces --model_id's, e.g. SDXL-Lightning's "
        "sdxl_lightning_4step_unet.safetensors; the other submodels are reused from --model_id's build",
    )
    _add_lora_arguments(model)
    model.add_argument(
        "--embedding",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="an SDXL textual-inversion embedding (.safetensors with clip_l and clip_g vectors); its file name "
        "without the suffix is the word for it in prompts. Repeatable; no new build",
    )
    model.add_argument(
        "--embedding_dir",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="a folder of SDXL embeddings, each usable by its file name in prompts (other files are skipped)",
    )
    model.add_argument(
        "--models_dir",
        type=Path,
        default=PROJECT_DIR / "models",
        help="where built-in, converted (single-file), unoptimized and optimized models live (default: models/ in the "
        "project folder)",
    )
    model.add_argument(
        "--provider",
        choices=PROVIDER_CHOICES,
        default="auto",
        help="ONNX Runtime execution provider; auto = dml, else cuda, else cpu (default: %(default)s)",
    )
    model.add_argument("--device_id", type=_non_negative_int, default=0, help="GPU index for dml/cuda (default: 0)")


def _add_optimization_arguments(parser: argparse.ArgumentParser) -> None:
    optimize = parser.add_argument_group("optimization")
    optimize.add_argument(
        "--optimize",
        action="store_true",
        help="convert and optimize every submodel with Olive (also done on demand before "
        "generating if no optimized model exists)",
    )
    optimize.add_argument(
        "--list_builds",
        action="store_true",
        help="list the builds under --models_dir: name, what each was made from, the disk it takes",
    )
    optimize.add_argument(
        "--delete_build",
        default=None,
        metavar="NAME",
        help="delete build NAME (its optimized and unoptimized folders, as --list_builds names it)",
    )
    optimize.add_argument(
        "--cache_dir",
        type=Path,
        default=PROJECT_DIR / "cache",
        help="Olive cache; reruns reuse it (default: cache/ in the project folder)",
    )
    optimize.add_argument(
        "--clean_cache",
        action="store_true",
        help="start from an empty Olive cache and delete it afterwards (needs less disk: results are moved out of it)",
    )
    optimize.add_argument(
        "--use_fp16_fixed_vae",
        "--vae",
        dest="use_fp16_fixed_vae",
        nargs="?",
        const=DEFAULT_FP16_VAE,
        default=None,
        metavar="DIR|ID",
        help="build the VAE from another one and run it in fp16 on GPU providers: an fp16-fixed AutoencoderKL "
        "(the stock SDXL VAE stays fp32 because it overflows fp16), or a tiny AutoencoderTiny (TAESD-XL, e.g. "
        f"madebyollin/taesdxl: a fraction of the decoder's work, slightly softer images); without a value: "
        f"{DEFAULT_FP16_VAE}",
    )
    optimize.add_argument("--tempdir", type=Path, default=None, help="temporary folder for Olive and ONNX Runtime")


def _add_prompt_arguments(generate) -> None:
    generate.add_argument(
        "--prompt",
        default=None,
        help="text prompt; generates images when given. A1111's syntax: (word) x1.1, [word] /1.1, (word:1.3), "
        "BREAK starts a new 75-token chunk; longer prompts are read whole, in chunks",
    )
    generate.add_argument(
        "--from_png",
        type=Path,
        default=None,
        metavar="FILE",
        help="make a PNG's image again from its A1111 parameters (this tool's, A1111's, Forge's): prompt, negative "
        "prompt, steps, sampler and schedule type, CFG scale, seed, size (and denoising strength with "
        "--base_images); options given on the command line win",
    )


def _add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    generate = parser.add_argument_group("generation")
    _add_prompt_arguments(generate)
    generate.add_argument("--negative_prompt", default=None, help="what the images should not show")
    generate.add_argument(
        "--num_images",
        type=_positive_int,
        default=None,
        help="images to write (default: 1, or one per --base_images file)",
    )
    generate.add_argument("--batch_size", type=_positive_int, default=1, help="images per pipeline call (default: 1)")
    generate.add_argument("--num_inference_steps", type=_positive_int, default=50, help="denoising steps (default: 50)")
    generate.add_argument(
        "--guidance_scale",
        type=_guidance,
        default=5.0,
        help="classifier-free guidance scale; <= 1 disables guidance (default: 5.0)",
    )
    generate.add_argument(
        "--disable_classifier_free_guidance",
        action="store_true",
        help="run the UNet once per step without the negative branch (faster, weaker prompts)",
    )
    generate.add_argument(
        "--seed",
        type=_non_negative_int,
        default=None,
        help="seed of the first image; image i uses seed + i (default: random)",
    )
    generate.add_argument(
        "--image_size",
        type=_positive_int,
        default=None,
        help="square image side in pixels (default: the model's native size)",
    )
    generate.add_argument(
        "--width",
        type=_positive_int,
        default=None,
        help="image width in pixels, a multiple of 32 for SDXL (16 for the built-in tiny models); "
        "overrides --image_size",
    )
    generate.add_argument(
        "--height",
        type=_positive_int,
        default=None,
        help="image height in pixels (a multiple, as --width); overrides --image_size",
    )
    generate.add_argument(
        "--output_dir",
        type=Path,
        default=Path("outputs"),
        help="where PNGs are written as NNNNN-<seed>.png (default: %(default)s)",
    )
    generate.add_argument(
        "--test_unoptimized",
        action="store_true",
        help="generate with the unoptimized (converted, not fused) ONNX models",
    )
    generate.add_argument(
        "--dynamic_dims",
        action="store_true",
        help="keep symbolic dims dynamic instead of pinning them to the run's shapes",
    )
    generate.add_argument(
        "--vae_tiling",
        action="store_true",
        help="decode images in overlapping tiles of half the model's native size (512 px for SDXL): far less GPU "
        "memory for the VAE decoder, for cards where a 1024x1024 image runs out of it; pixels differ slightly "
        "where tiles meet",
    )
    generate.add_argument(
        "--low_vram",
        action="store_true",
        help="for GPUs with little memory: --vae_tiling, and the text encoders' weights (1.5 GiB of SDXL's) freed "
        "once the prompt is encoded (a new prompt loads them again); a 1024x1024 SDXL image then needs about 9 GiB "
        "of free GPU memory instead of 14",
    )


def _add_refiner_arguments(parser: argparse.ArgumentParser) -> None:
    refine = parser.add_argument_group("refiner")
    refine.add_argument(
        "--base_images",
        type=Path,
        nargs="+",
        default=(),
        metavar="IMAGE",
        help="images to start from: img2img with a base model, refinement with a refiner; output image i starts "
        "from base image i modulo their number; their size sets the run's size (--width/--height resize them)",
    )
    refine.add_argument(
        "--mask_image",
        type=Path,
        nargs="+",
        default=(),
        metavar="MASK",
        help="inpainting: white repaints, black keeps; one mask for every base image, or one per base image "
        "(resized to the run's size)",
    )
    refine.add_argument(
        "--strength",
        type=float,
        default=None,
        help="how much of the schedule is run again on a base image, in (0, 1] (default: 0.3 with a refiner, 0.75 "
        "for img2img and inpainting with a base model)",
    )
    refine.add_argument(
        "--aesthetic_score", type=_aesthetic, default=6.0, help="refiner aesthetic-score conditioning (default: 6.0)"
    )
    refine.add_argument(
        "--negative_aesthetic_score",
        type=_aesthetic,
        default=2.5,
        help="refiner aesthetic score of the negative branch (default: 2.5)",
    )
    refine.add_argument(
        "--refiner_model_id",
        default=None,
        help="base -> refiner in one run: the base model denoises the first --high_noise_frac of "
        "the schedule and this refiner finishes it, latents handed over without a PNG",
    )
    refine.add_argument(
        "--refiner_config",
        default=None,
        metavar="DIR|ID",
        help="--config for a single-file --refiner_model_id (default: SDXL 1.0's refiner configs)",
    )
    refine.add_argument(
        "--high_noise_frac",
        type=float,
        default=0.8,
        help="where the base hands over to --refiner_model_id, in (0, 1) (default: 0.8)",
    )


def _add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    sampler = parser.add_argument_group("sampler")
    sampler.add_argument(
        "--scheduler",
        choices=tuple(SAMPLERS),
        default=None,
        metavar="NAME",
        help=f"the sampler, by the names A1111 and ComfyUI users know: {', '.join(SAMPLERS)}; each is diffusers' "
        "scheduler configured from the model's own scheduler config (default: the model's scheduler, Euler for SDXL)",
    )
    sampler.add_argument(
        "--timestep_spacing",
        choices=TIMESTEP_SPACINGS,
        default=None,
        help="which timesteps the steps run at, for schedulers that have the option (SDXL-Lightning wants trailing; "
        "default: the model's scheduler config, leading for SDXL)",
    )
    sampler.add_argument(
        "--cfg_cutoff",
        type=_in_range(float, 0, "a fraction above 0 and at most 1", maximum=1),
        default=1.0,
        metavar="F",
        help="guidance for the first fraction F of the steps only; the rest run the UNet at batch 1 per image "
        "(about half a step's work; default 1: guidance on every step). On CUDA the UNet then runs without a "
        "CUDA graph",
    )
    sampler.add_argument(
        "--cache_interval",
        type=_positive_int,
        default=1,
        metavar="N",
        help="DeepCache: the full UNet on every N-th step only, its deep features reused on the steps between, "
        "which run only its outer blocks (default 1: the full UNet on every step). Builds two more UNet graphs on "
        "first use",
    )


def _add_job_arguments(parser: argparse.ArgumentParser) -> None:
    jobs = parser.add_argument_group("batch jobs")
    jobs.add_argument(
        "--prompts_file",
        type=Path,
        default=None,
        metavar="FILE",
        help="a job: one prompt per line (.txt, # comments), or rows of .jsonl / .csv with any of the fields prompt, "
        "negative_prompt, seed, num_images, num_inference_steps, guidance_scale, width, height, scheduler (the "
        "others from the command line); writes <row>-<key>-<image>-<seed>.png and manifest.jsonl in --output_dir; "
        "run it again to finish an interrupted job",
    )
    jobs.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="run --prompts_file on Ray Data: alone, a local Ray runtime in this process; 'auto', host:port or "
        "ray://host:port joins a cluster (needs: pip install 'ray[data]==2.60.0')",
    )
    jobs.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="Ray actors, each with the pipeline loaded once (default: one per GPU, one for --provider cpu)",
    )


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    serving = parser.add_argument_group("HTTP API (A1111's /sdapi/v1, see docs/serve.md)")
    serving.add_argument(
        "--serve",
        action="store_true",
        help="serve AUTOMATIC1111's HTTP API (/sdapi/v1/txt2img, img2img, progress, ...) with the model loaded "
        "once; with --ray, on Ray Serve with --workers replicas",
    )
    serving.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    serving.add_argument(
        "--port",
        type=_in_range(int, 1, "a port from 1 to 65535", 65535),
        default=7860,
        help="port to listen on (default 7860, as A1111)",
    )
    serving.add_argument(
        "--api_auth",
        default=None,
        metavar="USER:PASS[,USER:PASS]",
        help="HTTP basic authentication for every endpoint (as A1111's --api-auth)",
    )
    serving.add_argument(
        "--serve_model",
        action="append",
        default=[],
        metavar="ID",
        help="another model (any --model_id value) clients may switch to with sd_model_checkpoint (repeatable)",
    )


def _add_safety_arguments(parser: argparse.ArgumentParser) -> None:
    safety = parser.add_argument_group("safety checker")
    safety.add_argument(
        "--safety_checker",
        default=None,
        metavar="ID|DIR",
        help="check every image with this StableDiffusionSafetyChecker (hub id, folder, or tiny-safety-checker); "
        "default: the model folder's own safety_checker, if any",
    )
    safety.add_argument(
        "--max_safety_retries",
        type=_non_negative_int,
        default=3,
        help="how often a flagged image is regenerated with a fresh seed before giving up (default: 3)",
    )


def parse_options(argv: list[str] | None = None) -> Options:
    """Parse ``argv`` (``sys.argv[1:]`` by default) into validated :class:`Options`."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.from_png is not None:
        _take_from_png(args, given=_given_options(argv))
    if args.num_images is None:
        args.num_images = max(1, len(args.base_images))
    args.base_images = tuple(args.base_images)
    args.mask_image = tuple(args.mask_image)
    args.lora, args.lora_dir = tuple(args.lora), tuple(args.lora_dir)
    args.controlnet, args.control_image = tuple(args.controlnet), tuple(args.control_image)
    args.embedding, args.embedding_dir = tuple(args.embedding), tuple(args.embedding_dir)
    args.serve_model = tuple(args.serve_model)
    options = Options(**vars(args))
    check_options(options)
    return options


def _given_options(argv: list[str]) -> set[str]:
    """The options ``argv`` sets itself (abbreviations and ``--flag=value`` included), not by default."""
    parser = build_parser()
    for action in parser._actions:  # argparse has no public "was it given" query
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _take_from_png(args: argparse.Namespace, *, given: set[str]) -> None:
    """``--from_png``: the PNG's parameters for every option the command line does not set itself."""
    from sd_utils.generation.lora_tags import prompt_loras
    from sd_utils.generation.png_parameters import read_png_parameters

    found = read_png_parameters(args.from_png)
    values = dict(found.options)
    if given & {"image_size", "width", "height"}:  # the command line's size wins as a whole
        for name in ("image_size", "width", "height"):
            values.pop(name, None)
    if not args.base_images:
        values.pop("strength", None)  # txt2img (A1111 writes it for hires fix too)
    for name, value in values.items():
        if name not in given:
            setattr(args, name, value)
    made_with = " ".join(filter(None, (found.model, f"[{found.model_hash}]" if found.model_hash else None)))
    loras = ", ".join(f"{name} x{weight:g}" for name, weight in prompt_loras(found.options["prompt"]))
    logger.info(
        "--from_png %s: %s%s%s",
        args.from_png,
        ", ".join(
            f"{name} {value!r}" for name, value in values.items() if name not in given | {"prompt", "image_size"}
        ),
        f"; made with model {made_with}" if made_with else "",
        f"; its prompt's LoRAs ({loras}) are read from --lora_dir" if loras else "",
    )


def _check_control_options(options: Options) -> None:
    if len(options.control_image) != len(options.controlnet) and not options.serve:  # a server's come with requests
        raise UserInputError(
            f"{len(options.controlnet)} --controlnet and {len(options.control_image)} --control_image: give one "
            "control image per ControlNet, in the same order"
        )
    if options.controlnet and options.control_start >= options.control_end:
        raise UserInputError(
            f"--control_start {options.control_start:g} is not before --control_end {options.control_end:g}; "
            "e.g. 0 and 0.8"
        )
    if options.controlnet and options.test_unoptimized:
        raise UserInputError("--controlnet runs optimized builds only; leave out --test_unoptimized")
    if options.cache_interval > 1 and options.controlnet:
        raise UserInputError(
            f"--cache_interval {options.cache_interval} with --controlnet: a ControlNet feeds the deep blocks that "
            "DeepCache skips; leave out one of them (--cfg_cutoff works with ControlNets)"
        )
    if options.cache_interval > 1 and options.test_unoptimized:
        raise UserInputError("--cache_interval runs optimized builds only; leave out --test_unoptimized")


def _check_lora_options(options: Options) -> None:
    if options.fuse_loras and not options.lora:
        raise UserInputError("--fuse_loras fuses the --lora files into a build, and none is given; add --lora FILE")
    for folder in options.lora_dir:
        if not folder.expanduser().is_dir():
            raise UserInputError(
                f"--lora_dir {folder} is not a folder; give the folder holding your .safetensors LoRAs"
            )


def check_options(options: Options) -> None:
    """Checks that need no model; size checks against the model are in :func:`check_image_size`."""
    if options.list_builds or options.delete_build:
        return
    if not (
        options.optimize or options.interactive or options.serve or options.prompt is not None or options.prompts_file
    ):
        raise UserInputError(
            "nothing to do: pass --prompt TEXT to generate images, --prompts_file FILE for a job, --interactive for "
            "the window, --serve for the HTTP API, or --optimize"
        )
    _check_serve_options(options)
    _check_job_options(options)
    if options.interactive and options.base_images:
        raise UserInputError("--interactive does not refine --base_images; refine them from the command line")
    if not options.model_id.strip():
        raise UserInputError(
            "--model_id is empty; give a hub id (owner/name), a diffusers folder, a built-in model "
            f"({', '.join(BUILTIN_MODELS)}), or leave it out for {DEFAULT_MODEL_ID}"
        )
    if options.prompt is not None and not options.prompt.strip():
        raise UserInputError("--prompt is empty; give the text the image should show")
    if options.mask_image and not options.base_images:
        raise UserInputError("--mask_image needs --base_images: the images whose white-masked parts are repainted")
    if options.mask_image and len(options.mask_image) not in (1, len(options.base_images)):
        raise UserInputError(
            f"{len(options.mask_image)} --mask_image files for {len(options.base_images)} --base_images; give one "
            "mask for all, or one per base image"
        )
    _check_lora_options(options)
    _check_control_options(options)
    if options.cache_interval < 1:
        raise UserInputError(
            f"--cache_interval {options.cache_interval}: use 1 (the full UNet every step) or more, e.g. 3"
        )
    if options.cfg_cutoff <= 0:
        raise UserInputError("--cfg_cutoff 0 would drop guidance before the first step; use e.g. 0.6 (or leave it out)")
    if options.strength is not None and not 0 < options.strength <= 1:
        raise UserInputError(f"--strength {options.strength} is outside (0, 1]; use e.g. 0.3 for a light refinement")
    if not 0 < options.high_noise_frac < 1:
        raise UserInputError(
            f"--high_noise_frac {options.high_noise_frac} is outside (0, 1); use e.g. 0.8 (the base runs 80%)"
        )
    if options.base_images and options.refiner_model_id:
        raise UserInputError(
            "--base_images and --refiner_model_id are two different flows; refine files with --model_id REFINER "
            "--base_images ..., or generate and refine in one go with --refiner_model_id REFINER"
        )
    if options.base_images and options.num_images < len(options.base_images):
        raise UserInputError(
            f"--num_images {options.num_images} is fewer than the {len(options.base_images)} --base_images; "
            f"use --num_images {len(options.base_images)} or more, or pass fewer images"
        )
    if options.seed is not None and options.seed + options.num_images - 1 > MAX_SEED:
        raise UserInputError(
            f"--seed {options.seed} with --num_images {options.num_images} runs past the largest seed {MAX_SEED}; "
            "use a smaller --seed"
        )


def parse_credentials(text: str | None) -> list[tuple[str, str]]:
    """``--api_auth USER:PASS[,USER:PASS]`` as (user, password) pairs."""
    pairs = []
    for item in (text or "").split(",") if text else ():
        user, colon, password = item.strip().partition(":")
        if not colon or not user or not password:
            raise UserInputError(f"--api_auth {item.strip()!r}: expected USER:PASS (several separated by commas)")
        pairs.append((user, password))
    return pairs


def _check_serve_options(options: Options) -> None:
    if not options.serve:
        if options.api_auth or options.serve_model:
            raise UserInputError("--api_auth and --serve_model are for the HTTP API; add --serve")
        return
    for given, flag in (
        (options.prompt is not None, "--prompt"),
        (options.interactive, "--interactive"),
        (options.prompts_file, "--prompts_file"),
        (options.base_images, "--base_images"),
        (options.control_image, "--control_image"),
    ):
        if given:
            raise UserInputError(
                f"--serve and {flag}: the server takes what to generate from its requests; drop {flag}"
            )
    if options.workers and not options.ray:
        raise UserInputError(f"--workers {options.workers} sets Ray Serve's replicas: add --ray (or drop --workers)")
    parse_credentials(options.api_auth)


def _check_job_options(options: Options) -> None:
    if options.prompts_file is None:
        if (options.ray or options.workers) and not options.serve:
            raise UserInputError("--ray and --workers run a --prompts_file job or --serve; add --prompts_file FILE")
        return
    for given, flag in ((options.prompt is not None, "--prompt"), (options.interactive, "--interactive")):
        if given:
            raise UserInputError(f"{flag} and --prompts_file: give one (put the prompt in the file)")
    if options.base_images or options.refiner_model_id:
        raise UserInputError("--prompts_file jobs are text-to-image; run --base_images or --refiner_model_id alone")
    if options.workers and not options.ray:
        raise UserInputError(f"--workers {options.workers} sets the Ray actors of a job: add --ray (or drop --workers)")
    if options.ray not in (None, "local", "auto") and not _RAY_ADDRESS.match(options.ray):
        raise UserInputError(
            f"--ray {options.ray} is not a Ray address; give --ray alone (a local runtime), --ray auto, "
            "--ray HOST:PORT or --ray ray://HOST:PORT"
        )


# what --ray takes besides 'auto': HOST:PORT of a cluster's head (GCS), or ray://HOST:PORT (Ray Client)
_RAY_ADDRESS = re.compile(r"^(ray://)?[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")


def check_image_size(width: int, height: int, *, multiple: int) -> None:
    """Raise if the UNet cannot run at ``width`` x ``height`` (sizes must be multiples of ``multiple``)."""
    for flag, value in (("--width", width), ("--height", height)):
        if value % multiple:
            lower = max(multiple, value // multiple * multiple)
            raise UserInputError(
                f"{flag} {value} is not a multiple of {multiple} (the model's VAE x UNet downscale); "
                f"use {lower} or {lower + multiple}"
            )
