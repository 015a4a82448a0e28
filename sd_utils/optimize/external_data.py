"""External tensor data written and read one tensor at a time, so no model's weights are ever in memory twice."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx
from onnx import numpy_helper

# onnx.save_model's default: smaller tensors stay inside the .onnx file

SIZE_THRESHOLD = 1024


class ExternalDataWriter:
    """Appends tensor bytes to one external data file and points each tensor at its bytes; tensors smaller than
    ``threshold`` bytes stay inside the protobuf."""

    def __init__(self, onnx_file: Path, *, threshold: int = SIZE_THRESHOLD):
        self.threshold = threshold
        self.name = onnx_file.name + ".data"
        self._file = open(onnx_file.parent / self.name, "wb")  # noqa: SIM115 - closed by close()

    def place(self, tensor: onnx.TensorProto, data: bytes) -> None:
        # the bytes never go into the protobuf: upb allocates fields in the message's arena and frees nothing before
        # the message, so setting and clearing raw_data per tensor would keep the whole model in memory anyway
        del tensor.external_data[:]
        if len(data) < self.threshold:
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = data
            return
        offset = self._file.tell()
        self._file.write(data)
        self._file.flush()  # readable at once through other handles (onnx's, ExternalTensors')
        for key, value in (("location", self.name), ("offset", str(offset)), ("length", str(len(data)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensor.data_location = onnx.TensorProto.EXTERNAL
        tensor.ClearField("raw_data")

    def close(self) -> None:
        self._file.close()


def save_model(
    model: onnx.ModelProto, onnx_file: Path, tensor_bytes: Callable[[onnx.TensorProto], bytes | None]
) -> None:
    """Save ``model`` with every initializer's bytes (from ``tensor_bytes``, or the tensor itself when that returns
    None) in ``<onnx_file>.data``; the graph itself stays small, so the protobuf 2-GB limit never applies."""
    onnx_file.parent.mkdir(parents=True, exist_ok=True)
    writer = ExternalDataWriter(onnx_file)
    try:
        for tensor in model.graph.initializer:
            data = tensor_bytes(tensor)
            if data is None:
                if tensor.HasField("raw_data"):
                    data = tensor.raw_data
                else:  # typed fields (float_data, int64_data, ...): small, written by the fusions
                    data = numpy_helper.to_array(tensor).tobytes()
                    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                        tensor.ClearField(field)
            writer.place(tensor, data)
    finally:
        writer.close()
    onnx.save_model(model, str(onnx_file))


# ---------------------------------------------------------------------------------------------------- optimization


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    # onnx resolves external data against the current directory when no base directory is given, which is how
    # ONNX Runtime's fusions read the weights they repack
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


class ExternalTensors:
    """Reads the bytes of a model's external tensors (locations relative to ``folder``)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._files: dict[str, Any] = {}

    def __call__(self, tensor: onnx.TensorProto) -> bytes | None:
        if tensor.data_location != onnx.TensorProto.EXTERNAL or tensor.HasField("raw_data"):
            return None
        info = onnx.external_data_helper.ExternalDataInfo(tensor)
        handle = self._files.get(info.location)
        if handle is None:
            handle = self._files[info.location] = open(self.folder / info.location, "rb")  # noqa: SIM115
        handle.seek(info.offset or 0)
        return handle.read(info.length) if info.length else handle.read()

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()


def tensor_array(tensor: onnx.TensorProto, external: ExternalTensors) -> Any:
    """The values of ``tensor`` as a numpy array, its external bytes read through ``external`` (read-only when they
    come from the file)."""
    import numpy as np

    data = external(tensor)
    if data is None:
        return numpy_helper.to_array(tensor)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return np.frombuffer(data, dtype=dtype).reshape(tuple(tensor.dims))
