"""Weights: the embedded default model and the compact MTP delta shipped for it."""
