"""A bcl_jax embedding model in PyTorch: the module that `python -m bcl_jax.export --format=torch`
writes beside `model.safetensors` (as `bcl_jax_torch.py`), so the folder serves without bcl_jax.

    import torch, bcl_jax_torch
    model = bcl_jax_torch.load('exported/')           # manifest.json + model.safetensors
    emb = model(images)  # (B, 3, H, W) RGB pixels 0..255, uint8 or float -> (B, dim) unit rows

The module needs torch and safetensors only (never JAX or bcl_jax). Its state dict names are
torchvision's ResNet names under `backbone.` (strip the prefix and a torchvision or timm
`resnet18`/`resnet50` loads them, `strict=False` for the missing `fc`), then `backbone.pool.p`
(GeM's exponent, with pool='gem'), `head.weight`/`head.bias` (the embedding projection,
nn.Linear layout) and `classifier.weight` (+ `classifier.bias` for a softmax head) when the
model has a classifier. It computes what bcl_jax's `EmbeddingModel.embed` computes: pixels / 255
standardised by ImageNet's mean and std, the ResNet with BatchNorm's running statistics, global
average or GeM pooling, the linear head, L2 normalisation.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn
from torch.nn import functional as F

MANIFEST = 'manifest.json'
WEIGHTS = 'model.safetensors'
BN_EPSILON = 1e-5
GEM_EPS = 1e-6
NORM_EPS = 1e-12


def _conv(cin, cout, k, stride):
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)


def _bn(n):
    return nn.BatchNorm2d(n, eps=BN_EPSILON)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride):
        super().__init__()
        cout = planes * self.expansion
        self.conv1, self.bn1 = _conv(cin, planes, 3, stride), _bn(planes)
        self.conv2, self.bn2 = _conv(planes, cout, 3, 1), _bn(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(_conv(cin, cout, 1, stride), _bn(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride):
        super().__init__()
        cout = planes * self.expansion
        self.conv1, self.bn1 = _conv(cin, planes, 1, 1), _bn(planes)
        self.conv2, self.bn2 = _conv(planes, planes, 3, stride), _bn(planes)
        self.conv3, self.bn3 = _conv(planes, cout, 1, 1), _bn(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(_conv(cin, cout, 1, stride), _bn(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class GeM(nn.Module):
    """Generalised-mean pooling, (mean(max(x, eps)^p))^(1/p) over H and W; p learnable."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.full((1,), 3.0))

    def forward(self, x):
        return x.clamp(min=GEM_EPS).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


class ResNet(nn.Module):
    """torchvision's ResNet trunk ('imagenet' stem: 7x7/2 conv + 3x3/2 max pool; 'cifar': a
    3x3/1 conv), stage i of `width * 2**i` planes, pooled to (B, out_features)."""

    def __init__(self, *, stage_sizes, block, width, stem, pool):
        super().__init__()
        k, s = (7, 2) if stem == 'imagenet' else (3, 1)
        self.conv1, self.bn1 = _conv(3, width, k, s), _bn(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == 'imagenet' else nn.Identity()
        block_cls = {'basic': BasicBlock, 'bottleneck': Bottleneck}[block]
        cin = width
        for i, n in enumerate(stage_sizes):
            planes, blocks = width * 2**i, []
            for j in range(n):
                blocks.append(block_cls(cin, planes, 2 if (i > 0 and j == 0) else 1))
                cin = planes * block_cls.expansion
            self.add_module(f'layer{i + 1}', nn.Sequential(*blocks))
        self.num_stages = len(stage_sizes)
        self.out_features = cin
        self.pool = GeM() if pool == 'gem' else None

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f'layer{i + 1}')(x)
        return x.mean(dim=(2, 3)) if self.pool is None else self.pool(x)


def l2_normalize(x):
    """x / max(||x||, 1e-12), bcl_jax's `l2_normalize`."""
    return x * torch.rsqrt(x.square().sum(dim=-1, keepdim=True).clamp(min=NORM_EPS**2))


class Classifier(nn.Module):
    """Class logits from unit embeddings: 'softmax' emb @ W.T + b; 'cosface'/'arcface' the
    cosines between the embedding and the normalised rows of W (their margins are the loss's)."""

    def __init__(self, dim, num_classes, kind):
        super().__init__()
        self.kind = kind
        self.weight = nn.Parameter(torch.zeros(num_classes, dim))
        self.bias = nn.Parameter(torch.zeros(num_classes)) if kind == 'softmax' else None

    def forward(self, emb):
        if self.bias is not None:
            return F.linear(emb, self.weight, self.bias)
        return F.linear(l2_normalize(emb), l2_normalize(self.weight)).clamp(-1.0, 1.0)


class EmbeddingModel(nn.Module):
    """Raw RGB pixels (B, 3, H, W), 0..255, uint8 or float -> L2-normalised embeddings.

    `architecture`: the manifest's "architecture" entry (stage_sizes, block, width, stem, pool,
    embedding_dim, num_classes, head, mean, std)."""

    def __init__(self, architecture: dict):
        super().__init__()
        a = architecture
        self.backbone = ResNet(
            stage_sizes=a['stage_sizes'],
            block=a['block'],
            width=a['width'],
            stem=a['stem'],
            pool=a['pool'],
        )
        self.head = nn.Linear(self.backbone.out_features, a['embedding_dim'])
        self.classifier = None
        if a.get('num_classes'):
            self.classifier = Classifier(a['embedding_dim'], a['num_classes'], a['head'])
        self.register_buffer('mean', torch.tensor(a['mean']).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(a['std']).view(1, 3, 1, 1), persistent=False)

    def forward(self, images):
        x = (images.float() / 255.0 - self.mean) / self.std
        return l2_normalize(self.head(self.backbone(x)))

    def logits(self, images):
        """Class scores of the training classes (None without a classifier)."""
        return None if self.classifier is None else self.classifier(self(images))


def load(folder: str, device: str = 'cpu') -> EmbeddingModel:
    """The model in `folder` (manifest.json + model.safetensors), in eval mode."""
    from safetensors.torch import load_file

    with open(os.path.join(folder, MANIFEST)) as f:
        manifest = json.load(f)
    model = EmbeddingModel(manifest['architecture'])
    model.load_state_dict(load_file(os.path.join(folder, WEIGHTS), device=device), strict=True)
    return model.to(device).eval()
