"""The offline default: FedMS on scikit-learn's digits over 20 non-IID clients (Dirichlet
alpha 0.3), with a small randomly initialised ViT and LoRA: 12 rounds of stage 1 (FedAvg + SAL
of the global expert), then 12 rounds of stage 2 (local experts + gate, MoFM).

No pretrained weights can be fetched offline, so the frozen backbone is a random ViT; set
``model.pretrained`` to a hub id or a local checkpoint directory to use real weights.

The embedded config *is* the schema's defaults (``fedms_jax.config.Config``, one line of doc per
field there): a config file for another setting states only what differs from them (e.g.
``experiments/configs/fmnist_dinov2.py``).
"""
import ml_collections

from fedms_jax.config import Config


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(Config().to_dict())
