"""(c) A ViT variant: CIFAR-100 with ``google/vit-base-patch16-224-in21k`` (a linear head on the
[CLS] feature), otherwise as cifar100_clip.py.

    python experiments/compare.py --config experiments/configs/cifar100_vit.py \
        --out experiments/results/cifar100_vit --config.data.data_dir=$TFDS_DATA_DIR
"""
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_cifar100_clip", Path(__file__).with_name("cifar100_clip.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
    c = _base.get_config("cifar100")
    c.model.pretrained = "google/vit-base-patch16-224-in21k"
    c.model.head = "linear"
    c.client.lr = 3e-3
    return c
