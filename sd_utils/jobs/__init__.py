"""Batch jobs: a prompts file becomes images, resumable from a manifest, locally or on a Ray cluster."""
