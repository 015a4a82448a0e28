"""``alwayson_scripts.controlnet``: A1111's ControlNet extension units in a request, as the ``--controlnet`` options
of the run. The server's ControlNets are those given with ``--controlnet`` at its start (built then); a unit names
one by ``model`` (``name`` or ``name [hash]``, as the extension lists them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sd_utils.errors import UserInputError

# unit field -> the values at which the tool does what the extension does
_NEUTRAL = {
    "control_mode": ("Balanced", 0, "0", None),
    "guessmode": (None, False, 0),
    "mask": (None, ""),
}
# unit fields that change nothing here (the map is made at the run's size on the CPU)
_FREE = {
    "resize_mode",
    "enabled",
    "image",
    "input_image",
    "module",
    "model",
    "weight",
    "guidance_start",
    "guidance_end",
}
_FREE |= {"threshold_a", "threshold_b", "processor_res", "pixel_perfect", "low_vram", "hr_option", "save_detected_map"}


def _enabled_units(scripts: dict[str, Any]) -> list[dict[str, Any]]:
    """The enabled ControlNet units; another script with anything enabled is one line."""
    for name, script in scripts.items():
        args = (script or {}).get("args", []) if isinstance(script, dict) else script
        if name.lower() != "controlnet" and any(arg not in (False, None, {}, []) for arg in args or []):
            raise UserInputError(f"alwayson_scripts.{name}: no such script here (only controlnet); leave it out")
    script = next((value for name, value in scripts.items() if name.lower() == "controlnet"), None) or {}
    units = script.get("args", []) if isinstance(script, dict) else []
    return [unit for unit in units if isinstance(unit, dict) and unit.get("enabled", True)]


def _same_in_all(units: list[dict[str, Any]], field: str, default: Any) -> Any:
    values = {json.dumps(unit.get(field, default)) for unit in units}
    if len(values) > 1:
        raise UserInputError(
            f"alwayson_scripts.controlnet: the units have different {field} ({', '.join(sorted(values))}); this "
            f"server applies one {field} to all units, send the same in each"
        )
    return units[0].get(field, default)


# the extension's resize modes; all equal a plain resize when the image has the run's aspect ratio
_JUST_RESIZE = ("Just Resize", 0, "0", None)
_RESIZE_MODES = (*_JUST_RESIZE, "Crop and Resize", 1, "1", "Resize and Fill", 2, "2", "Inner Fit (Scale to Fit)")


def _check_resize(field: str, mode: Any, image, size: tuple[int, int]) -> None:
    if mode not in _RESIZE_MODES:
        raise UserInputError(f"{field}.resize_mode={json.dumps(mode)}: not a resize mode; send 'Just Resize'")
    if mode not in _JUST_RESIZE and abs(image.width * size[1] - image.height * size[0]) > 0.01 * image.width * size[1]:
        raise UserInputError(
            f"{field}.resize_mode={json.dumps(mode)}: the control image ({image.width}x{image.height}) has another "
            f"aspect ratio than the run ({size[0]}x{size[1]}) and this server only stretches it; send 'Just Resize' "
            "or an image of the run's aspect ratio"
        )


def control_changes(
    scripts: dict[str, Any], controlnets: dict[str, str], scratch: Path, decode_image, *, size: tuple[int, int]
) -> dict[str, Any]:
    """The ``--controlnet``/``--control_image``/... options of the request's units (their images written into
    ``scratch``) for a run of ``size`` (width, height); ``controlnets``: the server's ControlNets, name -> its
    ``--controlnet`` value."""
    units = _enabled_units(scripts or {})
    if not units:
        return {"controlnet": (), "control_image": ()}
    nets, images = [], []
    for index, unit in enumerate(units):
        field = f"alwayson_scripts.controlnet.args[{index}]"
        for key, value in unit.items():
            if key in _NEUTRAL and value not in _NEUTRAL[key]:
                raise UserInputError(f"{field}.{key}={json.dumps(value)}: not done here; send {_NEUTRAL[key][0]!r}")
            if key not in _NEUTRAL and key not in _FREE and value not in (None, False, 0, "", [], {}):
                raise UserInputError(f"{field}.{key}={json.dumps(value)}: not a ControlNet unit field here")
        name = str(unit.get("model") or "").split(" [")[0]
        if name not in controlnets:
            known = ", ".join(controlnets) or "none: start the server with --controlnet DIR|ID|FILE"
            raise UserInputError(f"{field}.model={json.dumps(unit.get('model'))}: not a ControlNet here ({known})")
        image = unit.get("image") or unit.get("input_image")
        if isinstance(image, dict):  # the extension's older {"image": ..., "mask": ...}
            image = image.get("image")
        images.append(scratch / f"control-{index}.png")
        decoded = decode_image(image, f"{field}.image").convert("RGB")
        _check_resize(field, unit.get("resize_mode"), decoded, size)
        decoded.save(images[-1])
        nets.append((controlnets[name], float(unit.get("weight", 1.0))))
    module = str(_same_in_all(units, "module", "none")).lower()
    if module not in ("none", "canny"):
        raise UserInputError(
            f"alwayson_scripts.controlnet module {module!r}: this server makes canny maps only; send the map "
            "made elsewhere (depth, pose) with module 'none'"
        )
    low, high = (_same_in_all(units, key, -1) for key in ("threshold_a", "threshold_b"))
    return {
        "controlnet": tuple(nets),
        "control_image": tuple(images),
        "control_preprocess": module,
        "canny_low": int(low) if module == "canny" and low not in (-1, None) else 100,
        "canny_high": int(high) if module == "canny" and high not in (-1, None) else 200,
        "control_start": float(_same_in_all(units, "guidance_start", 0.0)),
        "control_end": float(_same_in_all(units, "guidance_end", 1.0)),
    }
