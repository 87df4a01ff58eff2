"""In-shop (configs/inshop.py, whose docstring gives the data, recipe, hardware and expectations)
with the advbct new model only (bcl_jax.methods; its settings in config.advbct). The references publish
no In-shop settings for this method: the GLDv2 ones are kept, with In-shop's schedule.

    python -m bcl_jax.main --config=configs/inshop_advbct.py --workdir=$RUN \
        --config.data.inshop.root=$INSHOP
"""

from configs import inshop


def get_config(arg=None):
    c = inshop.get_config(arg)
    c.methods = ('advbct',)
    return c
