"""GLDv2 (configs/gldv2.py, whose docstring gives the data, hardware and expectations) with the old
model alone (ResNet-18 on 30% of the landmarks) and its old/old tests; the method configs reuse
it with --config.old.checkpoint=$OLD/old/ckpt.

    python -m bcl_jax.main --config=configs/gldv2_old.py --workdir=$RUN \
        --config.data.gldv2.root=$GLDV2 --config.data.revisited.root=$REVISITOP
"""

from configs import gldv2


def get_config(arg=None):
    c = gldv2.get_config(arg)
    c.methods = ()
    return c
