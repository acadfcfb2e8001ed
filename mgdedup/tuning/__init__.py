"""Adapting a model to images without training: whitening fitted on a folder, p* per
resolution."""
