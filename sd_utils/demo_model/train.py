"""Train the built-in demo model: SDXL's classes at toy width, from scratch, on the shapes world (shapes.py).

    python -m sd_utils.demo_model.train [--device cuda] [--set KEY=VALUE ...] [--out sd_utils/demo_model/weights]

Reproducible: fixed seeds, every setting in ``settings.json`` beside the weights. The settings below made the shipped
weights on a 2-core CPU in under an hour (bench/NOTES.md has the time, the losses and the quality check's score); on
a GPU (``--device cuda``) the same run takes minutes.

What is trained and why:

* ``vae`` (``AutoencoderKL``, 64x64 pixels <-> 16x16x4 latents): reconstruction (MSE + L1) + a small KL term; its
  ``scaling_factor`` is set from the trained latents' spread, as SDXL's was.
* the text encoders stay the tiny built-in's frozen random CLIP encoders: a random transformer already gives every
  caption a distinct, position-aware embedding, and the UNet's cross-attention learns to read it. Training them would
  add 2 x 1.6 M embedding parameters for no gain on 96 captions, and keeps them re-creatable from the builder's seed
  (only the UNets and the VAE ship).
* ``unet`` (SDXL base structure: ``text_time`` conditioning on the pooled embedding and the 6 size/crop ids):
  epsilon prediction under SDXL's own noise schedule, caption dropped to zero embeddings 10% of the time (SDXL's
  ``force_zeros_for_empty_prompt``), so classifier-free guidance works; the loss is Min-SNR weighted, which is what
  makes an hour of CPU enough; the exponential moving average of the weights is what is saved.
* the refiner's ``unet`` (refiner structure: text_encoder_2 only, 5 ids with the aesthetic score): the same
  objective on the low-noise end of the schedule (t < 400), which is what a refiner is asked to do; the dropped
  caption becomes the empty prompt's embedding with aesthetic score 2.5, as the img2img pipeline feeds it.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import shapes

logger = logging.getLogger(__name__)
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SETTINGS = {
    "seed": 0,
    "images": 4096,
    "vae_steps": 2000,
    "vae_batch": 16,
    "vae_lr": 2e-3,
    "vae_kl_weight": 1e-6,
    "vae_l1_weight": 1.0,
    "unet_steps": 6000,
    "unet_batch": 32,
    "unet_lr": 2e-3,
    "refiner_steps": 800,
    "refiner_max_timestep": 400,
    # Min-SNR-5 loss weighting for the base UNet: the same 192k samples score 99% with it, 64% without
    # (bench/experiments/demo_sweep.py, bench/NOTES.md)
    "unet_snr_gamma": 5.0,
    "caption_dropout": 0.1,
    "ema_decay": 0.999,
    "aesthetic_score": 6.0,
    "negative_aesthetic_score": 2.5,
}


def _log_every(step: int, total: int, loss: float, started: float, what: str) -> None:
    if step % 250 == 0 or step == total:
        logger.info("%s step %d/%d loss %.4f (%.0f s)", what, step, total, loss, time.perf_counter() - started)


def _optimizer(parameters, lr: float, steps: int):
    import torch

    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    return optimizer, schedule


def train_vae(vae, pixels, settings: dict, device, generator) -> dict:
    import torch

    vae.train().to(device)
    optimizer, schedule = _optimizer(vae.parameters(), settings["vae_lr"], settings["vae_steps"])
    started, losses = time.perf_counter(), []
    for step in range(1, settings["vae_steps"] + 1):
        index = torch.randint(0, len(pixels), (settings["vae_batch"],), generator=generator)
        batch = pixels[index].to(device)
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        # L1 beside MSE: MSE alone smooths the five thin points of a star into a disc (800 MSE steps: 75 of the
        # 96 scenes read back right after encode/decode; 1500 steps with L1 + MSE: 91; bench/NOTES.md)
        loss = (
            torch.nn.functional.mse_loss(reconstruction, batch)
            + settings["vae_l1_weight"] * torch.nn.functional.l1_loss(reconstruction, batch)
            + settings["vae_kl_weight"] * posterior.kl().mean()
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        _log_every(step, settings["vae_steps"], float(np.mean(losses[-50:])), started, "vae")
    vae.eval()
    return {
        "final_loss": float(np.mean(losses[-100:])),
        "seconds": round(time.perf_counter() - started, 1),
        "scenes_read_back": reconstruction_score(vae, device),
    }


def reconstruction_score(vae, device="cpu") -> int:
    """How many of the 96 scenes the judge still reads right (colour and shape) after encode + decode: what the
    UNet can reach at best, since every image it makes goes through this decoder."""
    import torch

    scenes = list(shapes.ALL_SCENES)
    pixels = torch.from_numpy(np.stack([shapes.draw(scene) for scene in scenes])).permute(0, 3, 1, 2)
    with torch.no_grad():
        decoded = vae.decode(vae.encode(pixels.float().to(device) / 127.5 - 1).latent_dist.mean).sample
    images = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return sum(shapes.judge(image).matches(scene) for image, scene in zip(images, scenes, strict=True))


def train_unet(
    unet,
    latents,
    conditions,
    settings: dict,
    device,
    generator,
    *,
    steps: int,
    max_timestep: int,
    snr_gamma: float,
    what: str,
) -> dict:
    """Epsilon-prediction training. ``conditions(index, drop)`` -> (hidden states, pooled, time ids) for the
    images ``index``, with the caption replaced by the unconditional one where ``drop``."""
    import torch
    from diffusers import DDPMScheduler

    from sd_utils.sources.builder import SDXL_SCHEDULER

    noise_schedule = DDPMScheduler(
        num_train_timesteps=SDXL_SCHEDULER["num_train_timesteps"],
        beta_start=SDXL_SCHEDULER["beta_start"],
        beta_end=SDXL_SCHEDULER["beta_end"],
        beta_schedule=SDXL_SCHEDULER["beta_schedule"],
    )
    weights = _timestep_weights(noise_schedule, snr_gamma)
    unet.train().to(device)
    optimizer, schedule = _optimizer(unet.parameters(), settings["unet_lr"], steps)
    # an exponential moving average of the weights is what gets saved: it samples much better than the last step's
    ema = [parameter.detach().clone() for parameter in unet.parameters()]
    started, losses = time.perf_counter(), []
    for step in range(1, steps + 1):
        index = torch.randint(0, len(latents), (settings["unet_batch"],), generator=generator)
        clean = latents[index].to(device)
        noise = torch.randn(clean.shape, generator=generator).to(device)
        timesteps = torch.randint(0, max_timestep, (len(index),), generator=generator)
        noisy = noise_schedule.add_noise(clean, noise, timesteps).to(device)
        drop = torch.rand(len(index), generator=generator) < settings["caption_dropout"]
        hidden, pooled, time_ids = (t.to(device) for t in conditions(index, drop))
        prediction = unet(
            noisy, timesteps.to(device), hidden, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample
        loss = torch.nn.functional.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (loss * weights[timesteps].to(device)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            decay = min(settings["ema_decay"], (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in unet.parameters()], 1 - decay)
        losses.append(loss.item())
        _log_every(step, steps, float(np.mean(losses[-50:])), started, what)
    with torch.no_grad():
        for parameter, average in zip(unet.parameters(), ema, strict=True):
            parameter.copy_(average)
    unet.eval()
    return {"final_loss": float(np.mean(losses[-100:])), "seconds": round(time.perf_counter() - started, 1)}


def training_images(settings: dict):
    """The jittered training scenes: (pixels in [-1, 1], NCHW float tensor; their scenes)."""
    import torch

    images, scenes = shapes.dataset(settings["images"], seed=settings["seed"])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0, scenes


def latent_means(vae, pixels, device):
    """The VAE's latent means of ``pixels`` (unscaled, on the CPU), encoded in chunks on ``device``."""
    import torch

    with torch.no_grad():
        return torch.cat([vae.encode(chunk.to(device)).latent_dist.mean.cpu() for chunk in pixels.split(256)])


def train_base_unet(pipeline, latents, scenes, settings: dict, device, generator, *, what: str = "unet") -> dict:
    """Train ``pipeline``'s (base) UNet on ``latents`` of ``scenes`` over the whole schedule, Min-SNR weighted."""
    return train_unet(
        pipeline.unet,
        latents,
        _conditions(pipeline, scenes, settings, refiner=False),
        settings,
        device,
        generator,
        steps=settings["unet_steps"],
        max_timestep=1000,
        snr_gamma=settings["unet_snr_gamma"],
        what=what,
    )


def _timestep_weights(noise_schedule, gamma: float):
    """Loss weight per timestep: Min-SNR-gamma (Hang et al., 2023, for epsilon prediction min(SNR, gamma) / SNR) when
    ``gamma`` > 0, else 1. It lowers the weight of the nearly clean timesteps, whose easy denoising otherwise takes
    most of the gradient, so the high-noise steps that decide colour and shape learn sooner."""
    import torch

    alphas = noise_schedule.alphas_cumprod
    if gamma <= 0:
        return torch.ones_like(alphas)
    snr = alphas / (1 - alphas)
    return torch.clamp(snr, max=gamma) / snr


def _with_tokenizers(pipeline, *, refiner: bool) -> None:
    """Give a built pipeline the real CLIP tokenizers (the builder writes them only into saved folders)."""
    import tempfile

    from transformers import CLIPTokenizer

    from sd_utils.sources.tokenizers import save_sdxl_tokenizers

    names = ("tokenizer_2",) if refiner else ("tokenizer", "tokenizer_2")
    with tempfile.TemporaryDirectory() as folder:
        save_sdxl_tokenizers(Path(folder), names=names)
        for name in names:
            setattr(pipeline, name, CLIPTokenizer.from_pretrained(Path(folder) / name))


def _caption_table(pipeline, scenes, *, refiner: bool):
    """Embeddings of every distinct caption (and of the unconditional input), computed once with the pipeline's own
    ``encode_prompt``; returns (hidden[n], pooled[n], uncond hidden, uncond pooled, caption -> row)."""
    import torch

    _with_tokenizers(pipeline, refiner=refiner)
    captions = sorted({scene.caption for scene in scenes})
    with torch.no_grad():
        hidden, _, pooled, _ = pipeline.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
        if refiner:  # the img2img pipeline's negative is the empty prompt's embedding
            empty_hidden, _, empty_pooled, _ = pipeline.encode_prompt(
                [""], device="cpu", do_classifier_free_guidance=False
            )
        else:  # force_zeros_for_empty_prompt
            empty_hidden, empty_pooled = torch.zeros_like(hidden[:1]), torch.zeros_like(pooled[:1])
    return hidden, pooled, empty_hidden, empty_pooled, {caption: row for row, caption in enumerate(captions)}


def _conditions(pipeline, scenes, settings: dict, *, refiner: bool):
    import torch

    hidden, pooled, empty_hidden, empty_pooled, rows = _caption_table(pipeline, scenes, refiner=refiner)
    scene_rows = torch.tensor([rows[scene.caption] for scene in scenes])
    size = float(shapes.SIZE)
    if refiner:
        positive = torch.tensor([size, size, 0.0, 0.0, settings["aesthetic_score"]])
        negative = torch.tensor([size, size, 0.0, 0.0, settings["negative_aesthetic_score"]])
    else:
        positive = negative = torch.tensor([size, size, 0.0, 0.0, size, size])

    def conditions(index, drop):
        chosen = scene_rows[index]
        keep = ~drop
        batch_hidden = torch.where(keep[:, None, None], hidden[chosen], empty_hidden)
        batch_pooled = torch.where(keep[:, None], pooled[chosen], empty_pooled)
        time_ids = torch.where(keep[:, None], positive, negative)
        return batch_hidden, batch_pooled, time_ids

    return conditions


def train(out_dir: Path, *, device: str = "cpu", settings: dict | None = None) -> dict:
    """Train VAE, base UNet and refiner UNet; save their safetensors and ``settings.json`` under ``out_dir``."""
    import torch
    from safetensors.torch import save_file

    from sd_utils.sources.builder import ARCHITECTURES, build_pipeline

    settings = {**SETTINGS, **(settings or {})}
    torch.manual_seed(settings["seed"])
    torch.use_deterministic_algorithms(True, warn_only=True)
    generator = torch.Generator().manual_seed(settings["seed"])
    report = {"settings": settings, "device": device, "torch": torch.__version__, "threads": torch.get_num_threads()}
    started = time.perf_counter()

    pixels, scenes = training_images(settings)
    base = build_pipeline(ARCHITECTURES["demo"], seed=settings["seed"], trained=False)
    refiner = build_pipeline(ARCHITECTURES["demo-refiner"], seed=settings["seed"], trained=False)
    refiner.text_encoder_2 = base.text_encoder_2  # the same frozen encoder, as in SDXL

    report["vae"] = train_vae(base.vae, pixels, settings, device, generator)
    means = latent_means(base.vae, pixels, device)
    scaling = float(1.0 / means.std())
    base.vae.register_to_config(scaling_factor=scaling)
    latents = means * scaling
    report["vae"]["scaling_factor"] = scaling

    report["unet"] = train_base_unet(base, latents, scenes, settings, device, generator)
    refiner_conditions = _conditions(refiner, scenes, settings, refiner=True)
    report["refiner_unet"] = train_unet(
        refiner.unet,
        latents,
        refiner_conditions,
        settings,
        device,
        generator,
        steps=settings["refiner_steps"],
        max_timestep=settings["refiner_max_timestep"],
        # all of the refiner's timesteps are low-noise ones, which Min-SNR would only scale down
        snr_gamma=0.0,
        what="refiner unet",
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, module in (("vae", base.vae), ("unet", base.unet), ("refiner_unet", refiner.unet)):
        state = {key: value.to("cpu", torch.float16).contiguous() for key, value in module.state_dict().items()}
        save_file(state, out_dir / f"{name}.safetensors")
    report["seconds"] = round(time.perf_counter() - started, 1)
    (out_dir / "settings.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def parse_setting(item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> (key, value in the type of the setting's default); KeyError for a key not in SETTINGS."""
    key, _, value = item.partition("=")
    if key not in SETTINGS:
        raise KeyError(f"unknown setting {key!r}; known: {', '.join(SETTINGS)}")
    return key, type(SETTINGS[key])(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        try:
            key, value = parse_setting(item)
        except KeyError as error:
            parser.error(f"--set {item}: {error.args[0]}")
        overrides[key] = value
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    report = train(args.out, device=args.device, settings=overrides)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
