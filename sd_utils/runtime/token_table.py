"""A text encoder's token table with some rows replaced: textual-inversion vectors without a new build (the session
gets it through ``weight_overrides.py``; the build's model file is untouched)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def token_table(model_file: Path) -> tuple[str, np.ndarray]:
    """(initializer name, values) of the graph's token table: of the 2-D initializers that a ``Gather`` reads rows
    from (token and position embeddings), the one with the most rows. Only that tensor is read (external data
    included)."""
    import onnx

    from sd_utils.optimize.external_data import ExternalTensors, tensor_array

    model = onnx.load(str(model_file), load_external_data=False)
    initializers = {item.name: item for item in model.graph.initializer}
    gathered = [
        initializers[node.input[0]]
        for node in model.graph.node
        if node.op_type == "Gather" and node.input[0] in initializers and len(initializers[node.input[0]].dims) == 2
    ]
    if not gathered:
        raise ValueError(f"{model_file} has no token table (a Gather from a 2-D initializer)")
    tensor = max(gathered, key=lambda item: item.dims[0])
    external = ExternalTensors(model_file.parent)
    try:
        return tensor.name, tensor_array(tensor, external)
    finally:
        external.close()


def with_rows(model_file: Path, rows: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """The token table of ``model_file`` with ``rows`` (token id -> vector) in place, as an initializer override
    (name -> values) for the session."""
    name, table = token_table(model_file)
    table = table.copy()
    for token, vector in rows.items():
        table[token] = vector.astype(table.dtype)
    return {name: table}
