"""Optimizing a model: the build's identity, Olive workflows and the custom passes they run."""
