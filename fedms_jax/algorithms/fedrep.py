"""FedRep (Collins et al. 2021, "Exploiting Shared Representations for Personalized Federated
Learning") on LoRA: the body (the LoRA adapters) is federated, the head is local.

Each round a client first trains its own head with the body fixed (``fedrep.head_fraction`` of
its local steps), then the body with the head fixed (the rest), and uploads the body's delta.
Unlike FedPer, head and body never train at the same time: the head fits the representation
the client just received before the body moves. The head's optimizer state persists on its
client. No global model (no shared head).
"""
from __future__ import annotations

from fedms_jax.federated.protocol import Algorithm, Settings, single
from fedms_jax.algorithms.fedper import local_head_init, local_head_stage
from fedms_jax.config import FedRepConfig


def fedrep(settings: Settings, options: FedRepConfig = FedRepConfig()) -> Algorithm:
    """FedRep; ``options`` is ``config.fedrep`` (validated when it was made)."""
    segments = ((("head",), options.head_fraction), (("lora",), 1.0 - options.head_fraction))
    return single("fedrep", settings, local_head_init(settings), local_head_stage(settings, segments=segments))
