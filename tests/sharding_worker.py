"""Run with 8 simulated CPU devices: 2 rounds under each (clients x model, strategy) layout.

    python sharding_worker.py OUT.npz
"""
import sys

import jax
import numpy as np

from fed_helpers import flat, run_rounds, tiny_config
from fedms_jax.federated import sharding

LAYOUTS = [(8, 1, "replicated"), (2, 4, "fsdp"), (4, 2, "fsdp"), (2, 4, "tensor")]
out = {"num_devices": len(jax.devices())}
for clients, model, strategy in LAYOUTS:
    config = tiny_config("algorithm=fedms", "rounds=2", "stage1_rounds=1", f"mesh.clients={clients}",
                         f"mesh.model={model}", f"mesh.strategy={strategy}")
    server, _, engine, _ = run_rounds(config, 2)
    name = f"{clients}x{model}_{strategy}"
    assert dict(engine.mesh.shape) == {"clients": clients, "model": model}
    out[f"server_{name}"] = flat(server.trainable)
    per_device = sharding.bytes_per_device(engine.backbone)
    out[f"device_bytes_{name}"] = np.asarray(sorted(per_device.values()))
    out[f"total_bytes_{name}"] = sum(x.nbytes for x in jax.tree_util.tree_leaves(engine.backbone))
    # The bytes the rule table shards (its leaves with a 'model' axis), and one device's share.
    specs = jax.tree_util.tree_leaves(sharding.partition_specs(engine.backbone, strategy, model),
                                      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    leaves = jax.tree_util.tree_leaves(engine.backbone)
    split = [x for x, s in zip(leaves, specs) if "model" in tuple(s)]
    out[f"split_bytes_{name}"] = sum(x.nbytes for x in split)
    dev0 = engine.mesh.devices.flat[0]
    out[f"split_dev0_{name}"] = sum(s.data.nbytes for x in split for s in x.addressable_shards if s.device == dev0)
np.savez(sys.argv[1], **out)
