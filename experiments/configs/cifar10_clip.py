"""(b) The paper-scale setting on CIFAR-10: as cifar100_clip.py (CLIP ViT-B/32, zero-shot text
head, 100 clients, Dirichlet alpha 0.1 / 0.5 via ``--config.data.alpha``, 10% participation)."""
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_cifar100_clip", Path(__file__).with_name("cifar100_clip.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
    return _base.get_config("cifar10")
