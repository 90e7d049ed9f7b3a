"""Shared tiny models, built once per session so the suite compiles little."""
from __future__ import annotations

import socket

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedms_jax.models.expert import Expert
from fedms_jax.models.lora import LoRASpec
from fedms_jax.models.transformer import EncoderSpec
from fedms_jax.models.vision import VisionSpec

TINY_LAYERS = 4


def tiny_vision_spec(flavor: str = "vit") -> VisionSpec:
    enc = EncoderSpec(hidden_size=32, num_layers=TINY_LAYERS, num_heads=4, mlp_dim=64,
                      hidden_act="gelu", layer_norm_eps=1e-12)
    return VisionSpec(enc, image_size=16, patch_size=4, flavor=flavor,
                      projection_dim=24 if flavor == "clip" else None)


@pytest.fixture(scope="session")
def tiny_expert() -> Expert:
    return Expert(tiny_vision_spec(), LoRASpec(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "fc1", "fc2")), 5)


@pytest.fixture(scope="session")
def tiny_backbone(tiny_expert: Expert):
    return tiny_expert.init_backbone(jax.random.key(0))


def randomize_lora(lora, key: jax.Array, scale: float = 0.1):
    """A LoRA tree with non-zero B (a trained adapter) for tests that need LoRA to matter."""
    leaves, treedef = jax.tree_util.tree_flatten(lora)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    )


@pytest.fixture(scope="session")
def tiny_images() -> jax.Array:
    return jnp.asarray(np.random.default_rng(0).standard_normal((3, 16, 16, 3)), jnp.float32)


@pytest.fixture(scope="module")
def no_network():
    """Hub client offline and sockets refused for a whole module; yields the refused attempts."""
    import huggingface_hub.constants as hub_constants

    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access is disabled in this test module")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(hub_constants, "HF_HUB_OFFLINE", True)
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        yield attempts
