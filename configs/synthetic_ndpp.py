"""The built-in benchmark with the ndpp new model only (old model, then ndpp; no independent model,
so no update gain).

    python -m bcl_jax.main --config=configs/synthetic_ndpp.py --workdir=runs/synthetic_ndpp
"""

from configs import synthetic


def get_config(arg=None):
    c = synthetic.get_config(arg)
    c.methods = ('ndpp',)
    return c
