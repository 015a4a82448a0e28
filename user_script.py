"""Olive ``model_script``: how Olive loads each SDXL submodel, names its IO and builds export inputs.

``config_<submodel>.json`` names these entry points. Each receives what Olive passes (the model path, or the
``PyTorchModelHandler`` whose ``model_path`` is the diffusers folder) and reads the model facts from that folder, so
nothing here is specific to one checkpoint and no state is shared with the CLI.
"""

from __future__ import annotations

from pathlib import Path

from sd_utils.generation import safety
from sd_utils.optimize.export_models import dummy_inputs, load_submodel
from sd_utils.sources.model_spec import ModelSpec, submodel_io


def _entry_points(name: str):
    """(model_loader, io_config, dummy_inputs_func) for submodel ``name``.

    Plain functions, not ``functools.partial``: Olive calls only function objects and returns anything else as is.
    """

    def model_loader(model_path):
        return load_submodel(name, model_path)

    def io_config(handler) -> dict:
        return submodel_io(ModelSpec.from_folder(Path(handler.model_path)), name).olive_io_config()

    def dummy_inputs_func(handler):
        return dummy_inputs(name, handler.model_path)

    return model_loader, io_config, dummy_inputs_func


text_encoder_load, text_encoder_io_config, text_encoder_dummy_inputs = _entry_points("text_encoder")
text_encoder_2_load, text_encoder_2_io_config, text_encoder_2_dummy_inputs = _entry_points("text_encoder_2")
unet_load, unet_io_config, unet_dummy_inputs = _entry_points("unet")
# ControlNet runs: a ControlNet, and the UNet that takes its residuals
controlnet_load, controlnet_io_config, controlnet_dummy_inputs = _entry_points("controlnet")
unet_controlnet_load, unet_controlnet_io_config, unet_controlnet_dummy_inputs = _entry_points("unet_controlnet")
# --cache_interval runs (DeepCache): the UNet that also outputs the cached feature, and its outer blocks alone
unet_refresh_load, unet_refresh_io_config, unet_refresh_dummy_inputs = _entry_points("unet_refresh")
unet_shallow_load, unet_shallow_io_config, unet_shallow_dummy_inputs = _entry_points("unet_shallow")
vae_encoder_load, vae_encoder_io_config, vae_encoder_dummy_inputs = _entry_points("vae_encoder")
vae_decoder_load, vae_decoder_io_config, vae_decoder_dummy_inputs = _entry_points("vae_decoder")


# the optional safety checker (sd_utils/safety.py): its own IO, read from the checker's folder
def safety_checker_load(model_path):
    return safety.load_checker_module(model_path)


def safety_checker_io_config(handler) -> dict:
    return safety.olive_io_config(handler.model_path)


def safety_checker_dummy_inputs(handler):
    return safety.dummy_inputs(handler.model_path)
