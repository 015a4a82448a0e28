"""A build's graph with some initializers replaced (run-time LoRA weights, embeddings' token-table rows), as a model
file ONNX Runtime loads like the build's own: the graph (a few MB) written again with the new tensors in a data file
of their own, every other tensor read from the build's data file through a hard link. Nothing of the build changes.

Why not ``SessionOptions.add_initializer``: ONNX Runtime treats initializers handed over that way as shared with the
caller and does not pre-pack them for its CPU kernels (nor does it ``add_external_initializers``), which made a
full-size UNet step 10-20 % slower on the CPU (bench/NOTES.md, 2026-12-06); a model file keeps the step as it is.
"""

from __future__ import annotations

import os
import shutil
import weakref
from pathlib import Path

import numpy as np

OVERRIDES = "overrides"  # its data file: overrides.data (ExternalDataWriter names it after the model file)


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # same file system: no copy (the folder is made next to the build)
    except OSError:
        os.symlink(source.resolve(), target)


def model_with_initializers(model_file: Path, values: dict[str, np.ndarray]) -> tuple[Path, object]:
    """A model file equal to ``model_file`` but for the initializers in ``values``; returns it and an object to
    keep while a session uses it (the folder is deleted when that object goes; ``olive_workflow.staging_folder``
    deletes those of killed processes)."""
    import onnx

    from sd_utils.optimize.external_data import ExternalDataWriter
    from sd_utils.optimize.olive_workflow import external_data_files, staging_folder

    folder = staging_folder(model_file.parent.parent.parent, "weights-")
    holder = _Folder(folder)
    model = onnx.load(str(model_file), load_external_data=False)
    for name in external_data_files(model_file):
        _link(model_file.parent / name, folder / name)
    writer = ExternalDataWriter(folder / OVERRIDES)  # the changed tensors' bytes, in a file of their own
    try:
        for tensor in model.graph.initializer:
            if tensor.name in values:
                dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
                writer.place(tensor, np.ascontiguousarray(values[tensor.name], dtype=dtype).tobytes())
    finally:
        writer.close()
    onnx.save_model(model, str(folder / "model.onnx"))
    return folder / "model.onnx", holder


class _Folder:
    """Deletes its folder when it is no longer referenced (or at exit)."""

    def __init__(self, folder: Path):
        self.folder = folder
        weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)
