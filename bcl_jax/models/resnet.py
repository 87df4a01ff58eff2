"""ResNet backbones (Flax NNX): ResNet-18/50 (torchvision layout) and a small CIFAR-style net,
pooled by a global average or by generalised-mean (GeM) pooling with a learnable exponent.

Every module takes `train` as a call argument instead of relying on `model.train()` /
`model.eval()` mode switches, because the training code merges a split model inside a jitted
step and must pick batch versus running BatchNorm statistics per call.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# He-normal with fan_out, as torchvision initialises ResNet convolutions.
_CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "truncated_normal")
_BN_MOMENTUM = 0.9  # running = 0.9 * running + 0.1 * batch, torchvision's momentum=0.1.
_BN_EPSILON = 1e-5


def _conv(cin: int, cout: int, k: int, stride: int, *, rngs: nnx.Rngs, dtype) -> nnx.Conv:
    """Bias-free conv (a BatchNorm always follows) with torchvision's symmetric k//2 padding."""
    return nnx.Conv(
        cin,
        cout,
        (k, k),
        strides=stride,
        padding=[(k // 2, k // 2)] * 2,
        use_bias=False,
        kernel_init=_CONV_INIT,
        dtype=dtype,
        rngs=rngs,
    )


def _bn(n: int, *, rngs: nnx.Rngs, dtype, zero_scale: bool = False) -> nnx.BatchNorm:
    scale_init = nnx.initializers.zeros if zero_scale else nnx.initializers.ones
    return nnx.BatchNorm(
        n, momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, scale_init=scale_init, dtype=dtype, rngs=rngs
    )


class _Shortcut(nnx.Module):
    """1x1 conv + BN projection, used where a block changes resolution or width."""

    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs, dtype):
        self.conv = _conv(cin, cout, 1, stride, rngs=rngs, dtype=dtype)
        self.bn = _bn(cout, rngs=rngs, dtype=dtype)

    def __call__(self, x, *, train: bool):
        return self.bn(self.conv(x), use_running_average=not train)


class BasicBlock(nnx.Module):
    """Two 3x3 convs (ResNet-18/34 and CIFAR ResNets)."""

    expansion = 1

    def __init__(
        self, cin: int, planes: int, stride: int, *, rngs: nnx.Rngs, dtype, zero_init_residual: bool
    ):
        cout = planes * self.expansion
        self.conv1 = _conv(cin, planes, 3, stride, rngs=rngs, dtype=dtype)
        self.bn1 = _bn(planes, rngs=rngs, dtype=dtype)
        self.conv2 = _conv(planes, cout, 3, 1, rngs=rngs, dtype=dtype)
        self.bn2 = _bn(cout, rngs=rngs, dtype=dtype, zero_scale=zero_init_residual)
        needs_proj = stride != 1 or cin != cout
        self.shortcut = _Shortcut(cin, cout, stride, rngs=rngs, dtype=dtype) if needs_proj else None

    def __call__(self, x, *, train: bool):
        ura = not train
        y = nnx.relu(self.bn1(self.conv1(x), use_running_average=ura))
        y = self.bn2(self.conv2(y), use_running_average=ura)
        skip = x if self.shortcut is None else self.shortcut(x, train=train)
        return nnx.relu(y + skip)


class Bottleneck(nnx.Module):
    """1x1 reduce, 3x3 (carries the stride, as torchvision's 'v1.5'), 1x1 expand by 4."""

    expansion = 4

    def __init__(
        self, cin: int, planes: int, stride: int, *, rngs: nnx.Rngs, dtype, zero_init_residual: bool
    ):
        cout = planes * self.expansion
        self.conv1 = _conv(cin, planes, 1, 1, rngs=rngs, dtype=dtype)
        self.bn1 = _bn(planes, rngs=rngs, dtype=dtype)
        self.conv2 = _conv(planes, planes, 3, stride, rngs=rngs, dtype=dtype)
        self.bn2 = _bn(planes, rngs=rngs, dtype=dtype)
        self.conv3 = _conv(planes, cout, 1, 1, rngs=rngs, dtype=dtype)
        self.bn3 = _bn(cout, rngs=rngs, dtype=dtype, zero_scale=zero_init_residual)
        needs_proj = stride != 1 or cin != cout
        self.shortcut = _Shortcut(cin, cout, stride, rngs=rngs, dtype=dtype) if needs_proj else None

    def __call__(self, x, *, train: bool):
        ura = not train
        y = nnx.relu(self.bn1(self.conv1(x), use_running_average=ura))
        y = nnx.relu(self.bn2(self.conv2(y), use_running_average=ura))
        y = self.bn3(self.conv3(y), use_running_average=ura)
        skip = x if self.shortcut is None else self.shortcut(x, train=train)
        return nnx.relu(y + skip)


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
_STEMS = ("imagenet", "cifar")
POOLS = ("avg", "gem")
GEM_P_INIT = 3.0
GEM_EPS = 1e-6


def gem_pool(x: jax.Array, p: jax.Array, eps: float = GEM_EPS) -> jax.Array:
    """Generalised mean over the spatial axes of NHWC `x`: (mean(max(x, eps)^p))^(1/p), (B, C).

    p = 1 is the average, p -> inf the maximum. Radenović, Tolias and Chum, "Fine-tuning CNN
    image retrieval with no human annotation", TPAMI 2018, eq. 2 (cnnimageretrieval-pytorch,
    `cirtorch/layers/functional.py` `gem`: clamp at eps = 1e-6, learnable p initialised to 3).
    """
    x = jnp.maximum(x.astype(jnp.float32), eps)
    return jnp.mean(x**p, axis=(1, 2)) ** (1.0 / p)


class GeM(nnx.Module):
    """GeM pooling with one learnable exponent `p` (shape (1,), shared by every channel)."""

    def __init__(self, p: float = GEM_P_INIT, eps: float = GEM_EPS):
        self.p = nnx.Param(jnp.full((1,), p, jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return gem_pool(x, self.p[...], self.eps)


def stem_max_pool(x: jax.Array) -> jax.Array:
    """3x3/2 max pooling over one pixel of -inf padding (torchvision's MaxPool2d(3, 2, 1)).

    The padding is a separate `jnp.pad`, not max_pool's `padding=`: bit for bit the same, but
    jax2onnx 0.17.1 drops max_pool's explicit padding (its ONNX model came out a pixel short and
    wrong by 0.1; tests/test_serving.py).
    """
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    return nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2))


class ResNet(nnx.Module):
    """ResNet trunk returning globally pooled features of size `out_features`.

    Stage i has `width * 2**i` planes; every stage but the first halves the resolution in its
    first block. Input is NHWC float (already normalised); output is float32 (B, out_features).
    `pool`: 'avg' (global average) or 'gem' (`GeM`, its exponent a parameter `pool.p`).
    """

    def __init__(
        self,
        *,
        stage_sizes: Sequence[int],
        block: str,
        width: int = 64,
        stem: str,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        zero_init_residual: bool = True,
        in_channels: int = 3,
        pool: str = "avg",
    ):
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {list(POOLS)}, got {pool!r}")
        if block not in _BLOCKS:
            raise ValueError(f"block must be one of {sorted(_BLOCKS)}, got {block!r}")
        if stem not in _STEMS:
            raise ValueError(f"stem must be one of {list(_STEMS)}, got {stem!r}")
        block_cls = _BLOCKS[block]
        self.stem = stem
        k, s = (7, 2) if stem == "imagenet" else (3, 1)
        self.stem_conv = _conv(in_channels, width, k, s, rngs=rngs, dtype=dtype)
        self.stem_bn = _bn(width, rngs=rngs, dtype=dtype)

        blocks, cin = [], width
        for i, n in enumerate(stage_sizes):
            planes = width * 2**i
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(
                    block_cls(
                        cin,
                        planes,
                        stride,
                        rngs=rngs,
                        dtype=dtype,
                        zero_init_residual=zero_init_residual,
                    )
                )
                cin = planes * block_cls.expansion
        self.blocks = nnx.List(blocks)
        self.out_features = cin
        self.pool = GeM() if pool == "gem" else None

    def __call__(self, x, *, train: bool):
        x = nnx.relu(self.stem_bn(self.stem_conv(x), use_running_average=not train))
        if self.stem == "imagenet":
            x = stem_max_pool(x)
        for blk in self.blocks:
            x = blk(x, train=train)
        if self.pool is not None:
            return self.pool(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


# Stage sizes and block type of the named ResNets (torchvision's resnet18/resnet50).
NAMED_RESNETS = {
    "resnet18": {"stage_sizes": (2, 2, 2, 2), "block": "basic", "stem": "imagenet"},
    "resnet50": {"stage_sizes": (3, 4, 6, 3), "block": "bottleneck", "stem": "imagenet"},
}
BACKBONES = ("cifar_resnet", *NAMED_RESNETS)


def backbone_spec(name: str, depth: int | None) -> dict:
    """`stage_sizes`, `block` and `stem` of the backbone `name` (see `build_backbone`)."""
    if name == "cifar_resnet":
        if depth is None or depth < 8 or (depth - 2) % 6:
            raise ValueError(
                f"cifar_resnet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, "
                f"56, 110, ...), got {depth!r}"
            )
        n = (depth - 2) // 6
        return {"stage_sizes": (n, n, n), "block": "basic", "stem": "cifar"}
    if name in NAMED_RESNETS:
        return dict(NAMED_RESNETS[name])
    raise ValueError(f"unknown backbone {name!r}; valid names: {list(BACKBONES)}")


def build_backbone(
    name: str,
    *,
    width: int,
    depth: int | None,
    rngs: nnx.Rngs,
    dtype=jnp.float32,
    pool: str = "avg",
) -> ResNet:
    """Backbone by config name. `depth` selects the CIFAR net's size; named ResNets ignore it.
    `pool`: 'avg' or 'gem' (see `ResNet`)."""
    spec = backbone_spec(name, depth)
    return ResNet(**spec, width=width, rngs=rngs, dtype=dtype, pool=pool)
