"""Sharding strategies for the frozen backbone on a 2-D ('clients', 'model') mesh.

A strategy is a rule table: ``(regular expression over the parameter path, PartitionSpec)``
pairs, the first match wins, no match means replicated (as in big_vision / t5x / MaxText). Paths
are the backbone's Flax names joined by '/', e.g. ``encoder/blocks_3/attn/q/kernel``. A new
strategy is a new table, not new model code:

* ``replicated``: every device holds the whole backbone (the 1-D default; ``mesh.model`` = 1).
* ``fsdp``: every weight is split along one axis over 'model', and the compute is data-parallel
  over the whole mesh: the clients are split over ('clients', 'model'), so every device computes
  distinct clients, and each block's weights are all-gathered once per layer inside the scanned
  encoder (``gather_layers``, a ``transformer.layer_params_hook``) rather than the activations
  all-reduced.
* ``tensor``: Megatron-style. q, k, v and fc1 are column-parallel (their output features, i.e.
  whole attention heads and MLP columns, split over 'model'), o and fc2 row-parallel (input
  features split), so a block needs one reduction after attention and one after the MLP.
  Embeddings, layer norms and the row-parallel biases stay replicated (about 1% of ViT-B).

Where the clients go is ``client_axes(strategy)``: over both axes for ``fsdp``; over 'clients'
only for ``tensor`` (its 'model' groups split every client's matmuls, so a group computes the
same clients) and ``replicated`` (no 'model' axis). ``for_compute`` is the backbone as a round or
evaluation program uses it. LoRA trees and client states stay replicated: a ViT-B LoRA tree
(rank 8, q and v) is 0.3% of the backbone, and splitting it would add collectives to every
adapter matmul for no memory worth having.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
CLIENTS, MODEL = "clients", "model"

RULES: dict[str, list[tuple[str, P]]] = {
    "replicated": [],
    "fsdp": [
        (r"patch_embed/kernel$", P(None, None, None, MODEL)),
        (r"pos_embed$", P(None, MODEL)),
        (r".*", P(MODEL)),  # kernels on their input axis; vectors (biases, norms) split too
    ],
    "tensor": [
        (r"attn/(q|k|v)/kernel$", P(None, MODEL)),
        (r"attn/(q|k|v)/bias$", P(MODEL)),
        (r"attn/o/kernel$", P(MODEL, None)),
        (r"mlp/fc1/kernel$", P(None, MODEL)),
        (r"mlp/fc1/bias$", P(MODEL)),
        (r"mlp/fc2/kernel$", P(MODEL, None)),
    ],
}
STRATEGIES = tuple(RULES)


def client_axes(strategy: str) -> tuple[str, ...]:
    """The mesh axes the per-client (cohort) axis is split over under ``strategy``: both for
    ``fsdp`` (weights sharded, compute data-parallel), 'clients' only otherwise."""
    if strategy not in RULES:
        raise ValueError(f"mesh.strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    return (CLIENTS, MODEL) if strategy == "fsdp" else (CLIENTS,)


def client_devices(mesh: Mesh, strategy: str) -> int:
    """How many devices the client axis spans (clients per chunk must be a multiple of it)."""
    return int(np.prod([mesh.shape.get(axis, 1) for axis in client_axes(strategy)]))


def gather_layers(mesh: Mesh, strategy: str) -> Callable[[PyTree], PyTree] | None:
    """A ``transformer.layer_params_hook`` for the strategy, or None where none is needed.

    ``fsdp`` (with mesh.model > 1): constrains a block's params to replicated inside the scan
    body, i.e. all-gathers the block's weights once per layer, so its matmuls run data-parallel on
    the device's own clients. Without it XLA's partitioner splits the matmuls along the sharded
    weight axis and all-reduces the activations instead.
    """
    if strategy != "fsdp" or mesh.shape.get(MODEL, 1) == 1:
        return None
    full = NamedSharding(mesh, P())
    return lambda params: jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(x, full), params)


def make_mesh(clients: int = 0, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('clients', 'model') mesh over all (or the given) devices; ``clients=0``: all / model.

    Uses ``mesh_utils.create_device_mesh``, which knows TPU/GPU topologies and spans every
    process's devices in a multi-host run.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if model < 1 or n % model:
        raise ValueError(f"mesh.model = {model} must divide the {n} devices")
    clients = clients or n // model
    if clients * model != n:
        raise ValueError(f"mesh.clients x mesh.model = {clients} x {model} must equal the {n} devices")
    try:
        grid = mesh_utils.create_device_mesh((clients, model), devices=devices)
    except (AssertionError, ValueError, NotImplementedError):  # e.g. a subset of devices
        grid = np.asarray(devices).reshape(clients, model)
    return Mesh(grid, (CLIENTS, MODEL))


def path_of(key_path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)


def partition_specs(params: PyTree, strategy: str, model_size: int | None = None) -> PyTree:
    """A PartitionSpec for every leaf of ``params`` by the strategy's rules.

    A rule whose split does not divide a leaf's shape by ``model_size`` raises, naming the path,
    so a layout never silently falls back to replication.
    """
    if strategy not in RULES:
        raise ValueError(f"mesh.strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    rules = [(re.compile(pattern), spec) for pattern, spec in RULES[strategy]]

    def spec_for(key_path, leaf) -> P:
        path = path_of(key_path)
        for pattern, spec in rules:
            if pattern.search(path):
                if len(spec) > leaf.ndim:
                    raise ValueError(f"rule {pattern.pattern!r} -> {spec} does not fit {path} {leaf.shape}")
                for axis, name in enumerate(spec):
                    if name is not None and model_size and leaf.shape[axis] % model_size:
                        raise ValueError(
                            f"mesh.strategy={strategy!r}: {path} {tuple(leaf.shape)} axis {axis} is not "
                            f"divisible by mesh.model={model_size}"
                        )
                return spec
        return P()

    return jax.tree_util.tree_map_with_path(spec_for, params)


def shardings(params: PyTree, mesh: Mesh, strategy: str) -> PyTree:
    specs = partition_specs(params, strategy, mesh.shape.get(MODEL, 1))
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def constrain(params: PyTree, mesh: Mesh, strategy: str) -> PyTree:
    """``with_sharding_constraint`` of every leaf to its rule (inside jit)."""
    return jax.tree_util.tree_map(
        jax.lax.with_sharding_constraint, params, shardings(params, mesh, strategy)
    )


LAYER = re.compile(r"(^|/)blocks_\d+/")  # a leaf of one of the encoder's blocks


def for_compute(params: PyTree, mesh: Mesh, strategy: str) -> PyTree:
    """The backbone as a program computes with it (inside jit): ``constrain``, and under ``fsdp``
    the leaves outside the encoder's blocks (patch and position embeddings, class token, final
    norm: ~1-3% of a ViT) gathered once per program, while the blocks stay split until
    ``gather_layers`` gathers them one at a time. Left split, the embeddings' split output
    features lead XLA to split every later activation on its feature axis, and the scanned
    blocks then all-reduce and all-gather activations instead of their weights."""
    params = constrain(params, mesh, strategy)
    if gather_layers(mesh, strategy) is None:
        return params
    full = NamedSharding(mesh, P())
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x if LAYER.search(path_of(path)) else jax.lax.with_sharding_constraint(x, full), params)


def bytes_per_device(tree: PyTree) -> dict[Any, int]:
    """Bytes of the addressable shards of ``tree``'s arrays, per device."""
    out: dict[Any, int] = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def shard_bytes(tree: PyTree, mesh: Mesh, strategy: str) -> int:
    """Bytes one device holds of ``tree`` (arrays or ShapeDtypeStructs) under the strategy."""
    total = 0
    for leaf, sharding in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings(tree, mesh, strategy))):
        shape = sharding.shard_shape(leaf.shape)
        total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
    return total
