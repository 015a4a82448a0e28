"""Where a model comes from: built-in, local folder, hub id; its facts (ModelSpec) and tokenizers."""
