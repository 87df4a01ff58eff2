"""The built-in benchmark with the odpp new model only (old model, then odpp; no independent model,
so no update gain).

    python -m bcl_jax.main --config=configs/synthetic_odpp.py --workdir=runs/synthetic_odpp
"""

from configs import synthetic


def get_config(arg=None):
    c = synthetic.get_config(arg)
    c.methods = ('odpp',)
    return c
