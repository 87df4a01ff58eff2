"""In-shop (configs/inshop.py, whose docstring gives the data, recipe, hardware and expectations)
with the hot_refresh new model only (bcl_jax.methods; its settings in config.hot_refresh). The references publish
no In-shop settings for this method: the GLDv2 ones are kept, with In-shop's schedule.

    python -m bcl_jax.main --config=configs/inshop_hot_refresh.py --workdir=$RUN \
        --config.data.inshop.root=$INSHOP
"""

from configs import inshop


def get_config(arg=None):
    c = inshop.get_config(arg)
    c.methods = ('hot_refresh',)
    return c
