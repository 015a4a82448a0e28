"""Where each weight of a model lives in its ONNX graph, recorded at build time (``weight_map.json``), so that
run-time LoRAs (``sd_utils/runtime/lora_weights.py``) can change the graph's initializers without a new build.

The export and ONNX Runtime's fusions move weights around: a ``Linear`` becomes a ``MatMul`` over the transposed
matrix, the attention fusions pack Q, K and V (by head on GPUs), NHWC convolutions reorder the kernel, fp16
conversion rounds every value. What none of them does is change a weight's output rows (its *features*): each row of
a model weight (``weight.reshape(out, -1)[r]``, in the graph's dtype) is found, whole, as a row, a column or an NHWC
slice of some initializer. So the map is found by matching rows by their hash, with no knowledge of any particular
fusion: a new fusion that keeps rows is handled, one that changes values (folds a scale into a weight) leaves that
weight out of the map, which a LoRA touching it then reports by name.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

MAP_FILE = "weight_map.json"
FORMAT = 1
# the submodels LoRAs change: their build folders get a map
MAPPED_SUBMODELS = ("unet", "text_encoder", "text_encoder_2")


def layout_view(tensor: np.ndarray, layout: str) -> np.ndarray:
    """A view of ``tensor`` whose first axis runs over weight rows (writing to it writes to ``tensor``): ``rows``:
    its first axis, the rest flattened (Conv kernels, Gemm with transB); ``columns``: a 2-D tensor's columns (MatMul
    weights, packed QKV); ``nhwc``: a kernel stored [out, kh, kw, in] (NHWC convolutions), seen as [out, in, kh, kw].
    """
    if layout == "rows":
        return tensor.reshape(tensor.shape[0], -1)
    if layout == "columns":
        return tensor.T
    return tensor.transpose(0, 3, 1, 2)


def layouts_of(shape: tuple[int, ...]) -> tuple[str, ...]:
    return {2: ("rows", "columns"), 4: ("rows", "nhwc")}.get(len(shape), ("rows",))


# ONNX Runtime's fp16 conversion (onnxruntime.transformers.float16.convert_np_to_float16) clamps rather than flushes
FP16_TINY, FP16_MAX = np.float32(5.96e-08), np.float32(65504.0)


def as_graph_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``values`` as the build stores them in a graph of ``dtype``: fp16 as ONNX Runtime's conversion makes it
    (non-zero values closer to 0 than its smallest step become that step, finite ones beyond fp16's range its
    largest value, signs kept). Its own function does the same in ~12 passes over the array, for its debug log: three
    quarters of a full-size fp16 UNet's map time (bench/NOTES.md, 2026-12-07)."""
    if dtype == np.float16 and values.dtype != np.float16:
        values = values.astype(np.float32)  # a copy: clamped in place
        magnitude = np.abs(values)
        tiny = (magnitude > 0) & (magnitude < FP16_TINY)  # NaN compares false: left as it is
        values[tiny] = np.copysign(FP16_TINY, values[tiny])
        huge = (magnitude > FP16_MAX) & (magnitude < np.inf)
        values[huge] = np.copysign(FP16_MAX, values[huge])
        return values.astype(np.float16)
    return values.astype(dtype, copy=False)


_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def row_hashes(rows: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row's bytes (rows of one length always get the same coefficients); random odd
    multipliers make equal hashes of different rows a 2^-64 event."""
    length = rows.shape[1]
    coefficients = np.random.default_rng(length).integers(1, 2**63, size=length, dtype=np.uint64) * 2 + 1
    bits = np.ascontiguousarray(rows).view(_UINT[rows.dtype.itemsize])
    out = np.empty(rows.shape[0], dtype=np.uint64)
    step = max(1, (1 << 22) // max(length, 1))  # a few million elements at a time
    with np.errstate(over="ignore"):
        for start in range(0, rows.shape[0], step):
            chunk = bits[start : start + step].astype(np.uint64)
            out[start : start + step] = (chunk * coefficients).sum(axis=1, dtype=np.uint64)
    return out


class RowIndex:
    """The rows of a model's weights (2-D and more), hashed as they would be stored in each of ``dtypes``, by row
    length: only the hashes are kept, so the weights can stream through one at a time."""

    def __init__(self, weights: Iterable[tuple[str, np.ndarray]], dtypes: Iterable[np.dtype]):
        dtypes = sorted({np.dtype(dtype).str for dtype in dtypes})
        self.names: list[str] = []
        self.rows: list[int] = []  # each weight's row count
        found: dict[tuple[str, int], list[tuple[np.ndarray, int]]] = {}
        for name, value in weights:
            if value.ndim < 2 or not value.size:
                continue
            number = len(self.names)
            self.names.append(name)
            self.rows.append(value.shape[0])
            rows = value.reshape(value.shape[0], -1)
            for dtype in dtypes:
                found.setdefault((dtype, rows.shape[1]), []).append(
                    (row_hashes(as_graph_dtype(rows, np.dtype(dtype))), number)
                )
        self._tables: dict[tuple[str, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for key, parts in found.items():
            hashes = np.concatenate([part for part, _ in parts])
            owners = np.concatenate([np.full(len(part), number, dtype=np.int32) for part, number in parts])
            rows = np.concatenate([np.arange(len(part), dtype=np.int64) for part, _ in parts])
            order = np.argsort(hashes, kind="stable")
            self._tables[key] = (hashes[order], owners[order], rows[order])

    def table(self, dtype: np.dtype, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(sorted hashes, weight numbers, row numbers) of every row of ``length`` values in ``dtype``."""
        return self._tables.get((np.dtype(dtype).str, length))


def _match(index: RowIndex, view: np.ndarray) -> list[tuple[int, int]] | None:
    """For each row of ``view``: the (weight number, row) it is, or None when some row is no weight's row."""
    table = index.table(view.dtype, view.shape[1])
    if table is None:
        return None
    hashes, owners, rows = table
    wanted = row_hashes(view)
    low = np.searchsorted(hashes, wanted, side="left")
    high = np.searchsorted(hashes, wanted, side="right")
    if np.any(high == low):
        return None
    found = list(zip(owners[low].tolist(), rows[low].tolist(), strict=True))
    for position in np.flatnonzero(high - low > 1).tolist():
        # equal rows (all-zero ones, say): the one that continues the previous row's run, as every packing keeps a
        # weight's rows in order
        span = slice(low[position], high[position])
        candidates = list(zip(owners[span].tolist(), rows[span].tolist(), strict=True))
        follow = (found[position - 1][0], found[position - 1][1] + 1) if position else None
        found[position] = follow if follow in candidates else candidates[0]
    return found


def _runs(matches: list[tuple[int, int]]) -> Iterator[tuple[int, int, int, int]]:
    """(weight number, first initializer row, first weight row, length) of each run of consecutive rows."""
    start = 0
    for position in range(1, len(matches) + 1):
        if position < len(matches):
            (owner, row), (previous_owner, previous_row) = matches[position], matches[position - 1]
            if owner == previous_owner and row == previous_row + 1:
                continue
        yield matches[start][0], start, matches[start][1], position - start
        start = position


def weight_map(index: RowIndex, initializers: Iterable[tuple[str, np.ndarray]]) -> dict[str, list]:
    """weight name -> ``[[initializer, layout, [[initializer row, weight row, count], ...]], ...]``: every place in
    the graph that holds all of the weight's rows. ``index``: the model's weight rows; ``initializers``: (name,
    values) of the graph's tensors, each read once."""
    places: dict[str, list] = {}
    for tensor_name, tensor in initializers:
        if tensor.ndim < 2 or tensor.dtype.kind != "f" or tensor.size < 2:
            continue
        for layout in layouts_of(tensor.shape):
            view = layout_view(tensor, layout)
            view = view.reshape(view.shape[0], -1)
            if np.all(view == view.flat[0]):  # a constant tensor: its rows say nothing about where it came from
                break
            matches = _match(index, view)
            if matches is None:
                continue
            spans: dict[int, list] = {}
            for owner, first, row, count in _runs(matches):
                spans.setdefault(owner, []).append([first, row, count])
            for owner, owner_spans in spans.items():
                if sum(span[2] for span in owner_spans) == index.rows[owner]:  # the whole weight is there
                    places.setdefault(index.names[owner], []).append([tensor_name, layout, owner_spans])
            break
    return places


# ---------------------------------------------------------------------------------------------------- build files


def graph_initializers(onnx_file: Path, names: set[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(name, values) of each initializer of ``onnx_file`` (or of those in ``names``), read one at a time
    (external data included)."""
    import onnx

    from sd_utils.optimize.external_data import ExternalTensors, tensor_array

    model = onnx.load(str(onnx_file), load_external_data=False)
    external = ExternalTensors(onnx_file.parent)
    try:
        for tensor in model.graph.initializer:
            if names is None or tensor.name in names:
                yield tensor.name, tensor_array(tensor, external)
    finally:
        external.close()


def model_weights(submodel: str, root: Path) -> Iterator[tuple[str, np.ndarray]]:
    """The 2-D-and-more weights of ``root``'s component for ``submodel``, one at a time as float32, by the
    component's own names (``down_blocks.1.….to_q.weight``): from the safetensors files the export loads (not the
    variants), so only one tensor is in memory."""
    import torch
    from safetensors import safe_open

    from sd_utils.sources.model_spec import COMPONENT_OF

    folder = root / COMPONENT_OF[submodel]
    files = sorted(path for path in folder.glob("*.safetensors") if "." not in path.stem)
    for path in files:
        with safe_open(path, framework="pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118 (safe_open is no dict)
                value = tensors.get_tensor(name)
                if value.ndim >= 2 and value.is_floating_point():
                    yield name, value.to(torch.float32).numpy()


def _graph_dtypes(onnx_file: Path) -> set[np.dtype]:
    import onnx

    graph = onnx.load(str(onnx_file), load_external_data=False).graph
    found = {
        onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type) for tensor in graph.initializer if len(tensor.dims) >= 2
    }
    return {dtype for dtype in found if np.dtype(dtype).kind == "f"}


def write_weight_maps(submodel: str, root: Path, onnx_files: dict[Path, Path]) -> None:
    """Write ``weight_map.json`` for each ONNX file of ``submodel`` (``onnx_files``: model file -> where its map
    goes), from the weights in ``root``: read and hashed once, for the float dtypes of all the files."""
    started = time.perf_counter()
    dtypes = set().union(*(_graph_dtypes(onnx_file) for onnx_file in onnx_files))
    index = RowIndex(model_weights(submodel, root), dtypes)
    for onnx_file, destination in onnx_files.items():
        places = weight_map(index, graph_initializers(onnx_file))
        destination.write_text(json.dumps({"format": FORMAT, "weights": places}) + "\n", encoding="utf-8")
    logger.info("%s: weight maps of %d graph(s) in %.1f s", submodel, len(onnx_files), time.perf_counter() - started)


def read_weight_map(folder: Path) -> dict[str, list] | None:
    """The map of the submodel folder ``folder``, or None when its build has none (made by an older version)."""
    path = folder / MAP_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data["weights"] if data.get("format") == FORMAT else None
