"""Backbones and heads (Flax NNX)."""
