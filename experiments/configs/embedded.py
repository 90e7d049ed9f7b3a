"""(a) The embedded offline setting: the built-in default (digits, 20 Dirichlet(0.3) clients,
cohort 8, a small random ViT), used by experiments/compare.py for the committed table.

    python experiments/compare.py --config experiments/configs/embedded.py --out experiments/results/embedded
"""
from fedms_jax.configs.embedded import get_config as _embedded


def get_config():
    return _embedded()
