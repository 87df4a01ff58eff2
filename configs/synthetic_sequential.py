"""Three models in sequence on the built-in benchmark: φ_1 → φ_2 → φ_3 (method.md §10).

    python -m bcl_jax.main --config=configs/synthetic_sequential.py --workdir=runs/sequential
    python -m bcl_jax.main --config=configs/synthetic_sequential.py:smoke --workdir=runs/seq_smoke

φ_1 is the built-in benchmark's old model (30% of the 1,000 classes, a 4-wide CIFAR ResNet-8).
φ_2 sees 60% of the classes (nested: φ_1's classes and 300 more), 8 wide, trained with BCT
against φ_1's prototypes; φ_3 sees all classes, 16 wide, trained with BCT against φ_2's. The run
writes the 3×3 compatibility matrix (compatibility_synthetic.png), the backfill curves of φ_2
over φ_1's gallery and of φ_3 over φ_2's (backfill.png) and the upgrade summary (upgrades.png).
Expected on a 2-core CPU: about 3 minutes; every later model searches every earlier gallery
better than that gallery's own model does (docs/lifecycle.md gives the measured matrix).
"""

from configs import synthetic


def get_config(arg=None):
    if arg not in (None, 'smoke'):
        raise ValueError(f"unknown config argument {arg!r}; use 'smoke' or nothing")
    c = synthetic.get_config(arg)
    c.methods = ()
    c.upgrades = dict(
        v2=dict(fraction=0.6, method='bct', model=dict(width=8)),
        v3=dict(fraction=1.0, method='bct', model=dict(width=16)),
    )
    if arg == 'smoke':
        c.upgrades.v2.model.width = c.upgrades.v3.model.width = 4
    return c
