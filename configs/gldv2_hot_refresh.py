"""GLDv2 (configs/gldv2.py, whose docstring gives the data, recipe, hardware and expectations)
with the hot_refresh new model only (bcl_jax.methods; its settings in config.hot_refresh, each term weighted by
compat.weight); to reuse an old model trained by configs/gldv2_old.py, add
--config.old.checkpoint=$OLD/old/ckpt.

    python -m bcl_jax.main --config=configs/gldv2_hot_refresh.py --workdir=$RUN \
        --config.data.gldv2.root=$GLDV2 --config.data.revisited.root=$REVISITOP
"""

from configs import gldv2


def get_config(arg=None):
    c = gldv2.get_config(arg)
    c.methods = ('hot_refresh',)
    return c
