"""What the TPU test modules share: the libtpu skip and a tiny FedMS config with lane-aligned widths."""
from __future__ import annotations

import importlib.util

import pytest
from fed_helpers import TINY

from fedms_jax.config import apply_overrides, load_config, validate

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="the tpu extra (libtpu) is not installed: pip install -e '.[tpu]'")
# Lane-aligned widths (128), so XLA:TPU's tiled layouts add no padding and bytes are the shapes'.
MODEL = ["model.hidden=128", "model.mlp_dim=256", "model.heads=4", "model.layers=2"]
FEDMS = [*TINY, *MODEL, "algorithm=fedms", "rounds=2", "stage1_rounds=1", "eval_every=2"]


def tpu_config(*extra):
    return validate(apply_overrides(load_config("embedded"), [*FEDMS, *extra]))
