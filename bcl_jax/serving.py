"""A trained model out of bcl_jax, for serving: StableHLO (jax.export), ONNX, or PyTorch.

    python -m bcl_jax.export --format=stablehlo --config=configs/synthetic.py \
        --checkpoint=runs/x/new_bct/ckpt --out=runs/x/serving/stablehlo
    (--format=onnx, --format=torch likewise; without --format the command writes embedding
    files of the dataset, as before)

Each artefact computes what bcl_jax's evaluation computes (`EmbeddingModel.embed`: raw RGB
pixels in, ImageNet standardisation inside, BatchNorm's running statistics, L2-normalised
embeddings out) and lies in its own folder beside a `manifest.json` that states the input
(layout, size, channel order, dtype, value range), the preprocessing the images had in
evaluation (resize and crop, mean and std, applied inside the model) and the model's identity:

  stablehlo  model.stablehlo: `jax.export` serialisation of images (B, H, W, 3) uint8 ->
             (B, dim) float32, B symbolic; `load_stablehlo(folder)` reloads it.
  onnx       model.onnx: the same function converted by jax2onnx (opset 23), B dynamic;
             needs the `onnx` extra (jax2onnx, onnx; onnxruntime to run it).
  torch      model.safetensors (the whole model, classifier included, under PyTorch module
             names) + bcl_jax_torch.py (bcl_jax/serving_torch.py, a PyTorch module and
             `load(folder)`), taking (B, 3, H, W) RGB pixels as PyTorch does.

docs/lifecycle.md ("Export for serving") gives the tolerances the tests hold them to.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging as absl_logging
from etils import epath

from bcl_jax import embedding_files, sharding, train
from bcl_jax.models import convert
from bcl_jax.models.heads import IMAGENET_MEAN, IMAGENET_STD
from bcl_jax.models.resnet import backbone_spec

FORMAT = 'bcl_jax.serving/1'
FORMATS = ('stablehlo', 'onnx', 'torch')
MANIFEST = 'manifest.json'
ARTEFACTS = {'stablehlo': 'model.stablehlo', 'onnx': 'model.onnx', 'torch': 'model.safetensors'}
TORCH_MODULE = 'bcl_jax_torch.py'  # bcl_jax/serving_torch.py, copied beside the weights
BATCH = 'batch'  # the symbolic batch dimension's name


def host_weights(trained) -> tuple[dict, dict]:
    """The model's params and batch_stats as host NumPy arrays, class padding dropped."""
    return sharding.unpad((trained.params, trained.batch_stats), trained.num_classes)


def embed_function(trained):
    """images (B, H, W, 3), RGB pixels 0..255 (uint8 or float) -> (B, dim) float32 unit
    embeddings, the weights baked in: what bcl_jax's evaluation computes (`Trained.embed_fn`)."""
    params, stats = jax.device_get((trained.params, trained.batch_stats))
    return lambda images: trained.model(params, stats).embed(images)


def preprocessing(data_cfg) -> dict:
    """How evaluation made the images that the model embeds (bcl_jax.data.images.Preprocess)."""
    return dict(
        image_size=int(data_cfg.image_size),
        resize=data_cfg.get('eval_preprocess', 'center_crop'),
        resize_size=int(data_cfg.get('eval_resize_size', 0) or data_cfg.image_size),
        note=(
            "center_crop: shorter side resized to resize_size, then the central image_size "
            "square; resize: the whole image squashed to image_size x image_size. Then the raw "
            "pixels go in: the model divides by 255 and standardises with mean and std itself."
        ),
        channel_order='RGB',
        value_range=[0, 255],
        mean=list(IMAGENET_MEAN),
        std=list(IMAGENET_STD),
        normalisation_inside_model=True,
    )


def architecture(trained) -> dict:
    """What a PyTorch module needs to rebuild the model (bcl_jax/serving_torch.py)."""
    cfg = trained.model_cfg
    spec = backbone_spec(cfg.arch, cfg.get('depth'))
    return dict(
        arch=cfg.arch,
        stage_sizes=list(spec['stage_sizes']),
        block=spec['block'],
        stem=spec['stem'],
        width=int(cfg.width),
        pool=cfg.get('pool', 'avg'),
        embedding_dim=int(cfg.embedding_dim),
        num_classes=trained.num_classes,
        head=cfg.head,
        dtype=cfg.get('dtype', 'float32'),
        mean=list(IMAGENET_MEAN),
        std=list(IMAGENET_STD),
    )


def manifest(fmt: str, trained, data_cfg, identity: dict) -> dict:
    """manifest.json of an artefact of format `fmt`."""
    size = int(data_cfg.image_size)
    if fmt == 'torch':
        layout, shape, dtype = 'NCHW', [BATCH, 3, size, size], 'uint8 or float32 (0..255)'
    else:
        layout, shape, dtype = 'NHWC', [BATCH, size, size, 3], 'uint8'
    return dict(
        format=FORMAT,
        kind=fmt,
        artefact=ARTEFACTS[fmt],
        input=dict(layout=layout, shape=shape, dtype=dtype, channel_order='RGB'),
        output=dict(shape=[BATCH, int(trained.model_cfg.embedding_dim)], dtype='float32'),
        l2_normalised=True,
        preprocessing=preprocessing(data_cfg),
        architecture=architecture(trained),
        model=identity,
        **({'torch_module': TORCH_MODULE} if fmt == 'torch' else {}),
    )


def image_spec(size: int, dtype=jnp.uint8) -> jax.ShapeDtypeStruct:
    """(batch, size, size, 3) with a symbolic batch dimension."""
    (batch,) = jax.export.symbolic_shape(BATCH)
    return jax.ShapeDtypeStruct((batch, size, size, 3), dtype)


def to_stablehlo(trained, size: int) -> bytes:
    """The embedding function serialised by jax.export, the batch dimension symbolic, lowered
    for `export_platforms()` (a machine that reloads it must be of one of them)."""
    exported = jax.export.export(jax.jit(embed_function(trained)), platforms=export_platforms())(
        image_spec(size)
    )
    return bytes(exported.serialize())


def export_platforms() -> list[str]:
    """The platforms a StableHLO artefact is lowered for: this machine's and the CPU."""
    return sorted({jax.default_backend(), 'cpu'})


def load_stablehlo(folder: str):
    """images -> embeddings from a stablehlo folder (`jax.export.deserialize`)."""
    blob = (epath.Path(folder) / ARTEFACTS['stablehlo']).read_bytes()
    return jax.export.deserialize(bytearray(blob)).call


def to_onnx(trained, size: int) -> bytes:
    """The embedding function converted by jax2onnx (opset 23), with a dynamic batch dimension.

    jax2onnx goes in with `pip install --no-deps -r requirements-onnx.txt`: releases after 0.13.0
    declare orbax-checkpoint < 0.11.37, which bcl_jax's orbax-checkpoint 0.12 contradicts; 0.13.0
    fails on NNX's convolution padding under JAX 0.10; 0.17.1 works (requirements-onnx.txt).
    """
    with _quiet_jax2onnx():
        try:
            from jax2onnx import to_onnx as convert
        except ImportError as e:
            raise ImportError(
                f'--format=onnx needs jax2onnx ({e}): pip install onnx onnx-ir onnxruntime && '
                'pip install --no-deps -r requirements-onnx.txt'
            ) from e
        model = convert(
            embed_function(trained),
            [image_spec(size)],
            model_name='bcl_jax_embedding',
            input_names=['images'],
            output_names=['embeddings'],
        )
    # jax2onnx records intermediate shapes in NHWC where its convolutions run in NCHW;
    # onnxruntime warns about each and infers them anyway: drop them.
    del model.graph.value_info[:]
    return model.SerializeToString()


class _DropKnownWarnings(logging.Filter):
    """jax2onnx's notes that do not apply here: plugins for other libraries whose packages
    (equinox, dm_pix) are missing, and BatchNorm 'converted to inference mode', which is what
    bcl_jax's embedding already uses (running statistics)."""

    def filter(self, record):
        message = record.getMessage()
        return not (
            'use_running_average=False; converting to inference mode' in message
            or (message.startswith('Skipping') and 'import of jax2onnx.plugins.' in message)
        )


@contextlib.contextmanager
def _quiet_jax2onnx():
    dropping = _DropKnownWarnings()
    loggers = [logging.getLogger(), logging.getLogger('jax2onnx.plugins.plugin_system')]
    for logger in loggers:
        logger.addFilter(dropping)
    try:
        with warnings.catch_warnings():  # jax2onnx reads Flax variables' deprecated `.value`
            warnings.simplefilter('ignore', DeprecationWarning)
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(dropping)


def torch_state_dict(trained) -> dict[str, np.ndarray]:
    """The whole model's weights under bcl_jax_torch.EmbeddingModel's (PyTorch) names."""
    params, stats = host_weights(trained)
    cfg = trained.model_cfg
    spec = backbone_spec(cfg.arch, cfg.get('depth'))
    state = {
        f'backbone.{k}': v
        for k, v in convert.backbone_to_torch(params, stats, arch=cfg.arch, spec=spec).items()
    }
    if 'pool' in params['backbone']:
        state['backbone.pool.p'] = np.asarray(params['backbone']['pool']['p'])
    proj = params['head']['proj']
    state['head.weight'] = np.asarray(proj['kernel']).T  # (in, out) -> nn.Linear's (out, in)
    state['head.bias'] = np.asarray(proj['bias'])
    if params.get('classifier'):
        state['classifier.weight'] = np.asarray(params['classifier']['kernel']).T
        if params['classifier'].get('bias') is not None:
            state['classifier.bias'] = np.asarray(params['classifier']['bias'])
    return {k: np.ascontiguousarray(v, dtype=v.dtype) for k, v in state.items()}


def to_safetensors(trained) -> bytes:
    from safetensors.numpy import save

    return save(torch_state_dict(trained), metadata={'format': FORMAT})


def export(config, checkpoint_dir: str, out: str, fmt: str) -> dict:
    """`python -m bcl_jax.export --format=<fmt>`: the checkpoint's model as a serving artefact
    in `out`, with the preprocessing of `config.data`; returns the manifest."""
    if fmt not in FORMATS:  # before loading anything
        raise ValueError(f'--format={fmt!r}: choose embeddings or one of {list(FORMATS)}')
    trained = train.load_checkpoint(checkpoint_dir, sharding.make_mesh(config.mesh))
    identity = embedding_files.model_identity(trained, checkpoint_dir)
    written = write(fmt, trained, config.data, out, identity)
    absl_logging.info('%s of %s -> %s/%s', fmt, checkpoint_dir, out, written['artefact'])
    return written


def write(fmt: str, trained, data_cfg, out: str, identity: dict) -> dict:
    """Writes the artefact of format `fmt` and its manifest.json into `out`; returns the
    manifest. A folder holding another format's artefact is refused (one format a folder)."""
    if fmt not in FORMATS:
        raise ValueError(f'--format={fmt!r}: choose embeddings or one of {list(FORMATS)}')
    folder = epath.Path(out)
    found = folder / MANIFEST
    if found.exists():
        kind = json.loads(found.read_text()).get('kind')
        if kind != fmt:
            raise ValueError(
                f'{out} holds a {kind!r} export already: give each format its own --out folder'
            )
    size = int(data_cfg.image_size)
    build = {'stablehlo': to_stablehlo, 'onnx': to_onnx, 'torch': lambda t, s: to_safetensors(t)}
    blob = build[fmt](trained, size)
    folder.mkdir(parents=True, exist_ok=True)
    _write_bytes(folder / ARTEFACTS[fmt], blob)
    if fmt == 'torch':
        source = epath.Path(__file__).parent / 'serving_torch.py'
        _write_bytes(folder / TORCH_MODULE, source.read_bytes())
    text = manifest(fmt, trained, data_cfg, identity)
    _write_bytes(folder / MANIFEST, json.dumps(text, indent=1).encode())
    return text


def _write_bytes(path: epath.Path, data: bytes) -> None:
    """Written under a temporary name, then renamed over `path`."""
    tmp = path.parent / f'.{path.name}.tmp'
    tmp.write_bytes(data)
    if path.exists():
        path.unlink()
    tmp.rename(path)
