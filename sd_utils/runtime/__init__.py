"""ONNX Runtime: execution providers, sessions and the pipelines loaded over them."""
