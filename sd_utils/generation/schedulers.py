"""``--scheduler``: the samplers SDXL users know by name, each a diffusers scheduler made from the model's own
scheduler config (its betas, prediction type and offsets), so no sampler maths is written here."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from sd_utils.errors import UserInputError


@dataclasses.dataclass(frozen=True)
class Sampler:
    """One ``--scheduler`` name: the diffusers class, the config it changes, and A1111's names for it (PNG info)."""

    name: str
    scheduler_class: str
    config: dict[str, Any]
    a1111_sampler: str
    a1111_schedule: str = "Automatic"


_DPMPP = "DPMSolverMultistepScheduler"
SAMPLERS: dict[str, Sampler] = {
    row.name: row
    for row in (
        Sampler("euler", "EulerDiscreteScheduler", {}, "Euler"),
        Sampler("euler_a", "EulerAncestralDiscreteScheduler", {}, "Euler a"),
        Sampler("heun", "HeunDiscreteScheduler", {}, "Heun"),
        Sampler("dpmpp_2m", _DPMPP, {"algorithm_type": "dpmsolver++", "solver_order": 2}, "DPM++ 2M"),
        Sampler(
            "dpmpp_2m_karras",
            _DPMPP,
            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
            "DPM++ 2M",
            "Karras",
        ),
        Sampler("dpmpp_2m_sde", _DPMPP, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, "DPM++ 2M SDE"),
        Sampler(
            "dpmpp_2m_sde_karras",
            _DPMPP,
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
            "DPM++ 2M SDE",
            "Karras",
        ),
        Sampler("ddim", "DDIMScheduler", {}, "DDIM"),
        Sampler("unipc", "UniPCMultistepScheduler", {}, "UniPC"),
        Sampler("lms", "LMSDiscreteScheduler", {}, "LMS"),
        Sampler("lcm", "LCMScheduler", {}, "LCM"),
    )
}
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# diffusers' class of a model folder's own scheduler -> its A1111 name (for PNG info when --scheduler is not given)
_A1111_OF_CLASS = {row.scheduler_class: row.a1111_sampler for row in SAMPLERS.values() if not row.config}
# ... and its --scheduler name (the PNG's scheduler key records the one that ran)
_NAME_OF_CLASS = {row.scheduler_class: name for name, row in SAMPLERS.items() if not row.config}


def scheduler_class(name: str):
    import diffusers

    return getattr(diffusers, name)


def make_scheduler(model_config: dict[str, Any], name: str | None, timestep_spacing: str | None = None):
    """The scheduler ``name`` (None: the model's own) configured from ``model_config``, the model folder's
    ``scheduler_config.json``; ``timestep_spacing`` overrides the config's where the scheduler has that option."""
    config = {key: value for key, value in model_config.items() if not key.startswith("_")}
    if name is None:
        cls = scheduler_class(model_config["_class_name"])
    else:
        sampler = SAMPLERS[name]
        cls = scheduler_class(sampler.scheduler_class)
        config.update(sampler.config)
    accepted = inspect.signature(cls.__init__).parameters
    if timestep_spacing is not None:
        if "timestep_spacing" not in accepted:
            raise UserInputError(
                f"--timestep_spacing {timestep_spacing}: {cls.__name__} has no timestep spacing; drop the option or "
                "pick another --scheduler"
            )
        config["timestep_spacing"] = timestep_spacing
    # only what this class takes: another class's options (Euler's sigmas for LCM) would each print a warning
    return cls.from_config({key: value for key, value in config.items() if key in accepted})


def scheduler_name(model_config: dict[str, Any], name: str | None) -> str:
    """The ``--scheduler`` name of the scheduler a run uses: ``name``, or the model's own (its class name where the
    tool has no name for it)."""
    if name is not None:
        return name
    own = model_config.get("_class_name", "")
    return _NAME_OF_CLASS.get(own, own)


def a1111_names(model_config: dict[str, Any], name: str | None) -> tuple[str, str]:
    """(Sampler, Schedule type) as A1111 writes them in its PNG info."""
    if name is not None:
        return SAMPLERS[name].a1111_sampler, SAMPLERS[name].a1111_schedule
    karras = "Karras" if model_config.get("use_karras_sigmas") else "Automatic"
    return _A1111_OF_CLASS.get(model_config.get("_class_name", ""), model_config.get("_class_name", "?")), karras
