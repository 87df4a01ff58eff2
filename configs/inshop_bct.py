"""In-shop (configs/inshop.py, whose docstring gives the data, hardware and expectations) with
the bct new model only (no independent model, so no update gain).

    python -m bcl_jax.main --config=configs/inshop_bct.py --workdir=$RUN \
        --config.data.inshop.root=$INSHOP
"""

from configs import inshop


def get_config(arg=None):
    c = inshop.get_config(arg)
    c.methods = ('bct',)
    return c
