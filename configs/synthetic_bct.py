"""The built-in benchmark with the bct new model only (old model, then bct; no independent model,
so no update gain).

    python -m bcl_jax.main --config=configs/synthetic_bct.py --workdir=runs/synthetic_bct
"""

from configs import synthetic


def get_config(arg=None):
    c = synthetic.get_config(arg)
    c.methods = ('bct',)
    return c
