"""Embedding head, classifiers and the full embedding model (Flax NNX).

All retrieval similarities are dot products of unit vectors, so the model always returns
L2-normalised embeddings. Image normalisation happens here, in `EmbeddingModel`, so that
training, prototype computation and evaluation cannot disagree about preprocessing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bcl_jax.models.resnet import build_backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLASSIFIER_KINDS = ("softmax", "cosface", "arcface")


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps): finite (zero) for a zero vector, where x / ||x|| would give NaN."""
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


class EmbeddingHead(nnx.Module):
    """Linear projection to the embedding dimension, then L2 normalisation (float32)."""

    def __init__(self, in_features: int, dim: int, *, rngs: nnx.Rngs):
        self.proj = nnx.Linear(in_features, dim, rngs=rngs)

    def __call__(self, features: jax.Array) -> jax.Array:
        return l2_normalize(self.proj(features.astype(jnp.float32)))


class Classifier(nnx.Module):
    """Class logits from unit embeddings.

    'softmax': emb @ W + b. 'cosface' / 'arcface': cosines between emb and the normalised
    columns of W, in [-1, 1]; their margin and scale belong to the loss, not here.
    `kernel` is (dim, num_classes) so it can be sharded along the class axis.
    """

    def __init__(self, dim: int, num_classes: int, *, kind: str, rngs: nnx.Rngs):
        if kind not in CLASSIFIER_KINDS:
            raise ValueError(
                f"classifier kind must be one of {list(CLASSIFIER_KINDS)}, got {kind!r}"
            )
        self.kind = kind
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        self.kernel = nnx.Param(init(rngs.params(), (dim, num_classes), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_classes,), jnp.float32)) if kind == "softmax" else None

    def __call__(self, emb: jax.Array) -> jax.Array:
        emb = emb.astype(jnp.float32)
        w = self.kernel[...]
        if self.bias is not None:
            return emb @ w + self.bias[...]
        cos = l2_normalize(emb) @ l2_normalize(w, axis=0)
        return jnp.clip(cos, -1.0, 1.0)  # rounding can step past 1; arccos in ArcFace needs <= 1


class EmbeddingModel(nnx.Module):
    """Backbone + embedding head + optional classifier, on raw pixel values.

    `images`: (B, H, W, 3) pixel values in [0, 255], uint8 (or float holding the same range).
    Returns (unit embeddings (B, dim), logits (B, C) or None when there is no classifier, e.g.
    for a frozen old model used only to embed).
    """

    def __init__(
        self,
        backbone: nnx.Module,
        embedding_dim: int,
        num_classes: int | None,
        *,
        head: str = "softmax",
        rngs: nnx.Rngs,
    ):
        self.backbone = backbone
        self.head = EmbeddingHead(backbone.out_features, embedding_dim, rngs=rngs)
        self.classifier = (
            None
            if num_classes is None
            else Classifier(embedding_dim, num_classes, kind=head, rngs=rngs)
        )
        self.embedding_dim = embedding_dim
        self.num_classes = num_classes

    @staticmethod
    def normalize_images(images: jax.Array) -> jax.Array:
        """[0, 255] pixels -> float32 ImageNet-standardised, the single preprocessing site."""
        x = images.astype(jnp.float32) / 255.0
        return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)

    def __call__(self, images: jax.Array, *, train: bool):
        emb = self.head(self.backbone(self.normalize_images(images), train=train))
        logits = None if self.classifier is None else self.classifier(emb)
        return emb, logits

    def embed(self, images: jax.Array) -> jax.Array:
        """Inference embeddings (running BatchNorm statistics)."""
        return self(images, train=False)[0]


def build_model(cfg, num_classes: int | None, *, rngs: nnx.Rngs) -> EmbeddingModel:
    """Model from a config with `arch`, `width`, `depth`, `embedding_dim`, `head`.

    Optional fields: `dtype` (e.g. 'bfloat16') sets the backbone's compute dtype (parameters,
    head and classifier stay float32); `pool` ('avg' or 'gem', default 'avg') the backbone's
    global pooling.
    """
    dtype = jnp.dtype(getattr(cfg, "dtype", "float32"))
    backbone = build_backbone(
        cfg.arch,
        width=cfg.width,
        depth=cfg.depth,
        rngs=rngs,
        dtype=dtype,
        pool=getattr(cfg, "pool", "avg"),
    )
    return EmbeddingModel(backbone, cfg.embedding_dim, num_classes, head=cfg.head, rngs=rngs)
