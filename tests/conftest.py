"""Shared tiny models, built once per session so the suite compiles little.

One persistent XLA compilation cache for the whole session, this process and every subprocess a
test starts (they inherit the environment): many tests compile the same tiny programs (the SIGTERM
test runs one job three times; the CLI, resume and multi-device tests share configs), and a cache
hit returns the very executable a compile would have produced, so no result changes. It lives in
a fresh temporary directory per session, so nothing stale is ever read.

The suite is bound by compile time (hundreds of small programs, each run a few times), so tests
also compile with XLA's LLVM backend at -O0 (``--xla_backend_optimization_level=0``): about a
third less time per compile here. Every bitwise comparison in the suite compares programs built
with the same flags, and every comparison with an independent oracle has a tolerance.
"""
from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import socket
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # before jax is imported anywhere
    _cache = tempfile.mkdtemp(prefix="fedms_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
# The oracles compare at fp32 tolerances; JAX's default f32 matmul on GPUs is TF32 (on an H200
# the cached-vs-per-step test then differs by 3.5e-6 absolute). Full fp32 there; CPUs are fp32 anyway.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# With the tpu extra (libtpu) installed on a host with no TPU, JAX would probe for one in every
# process, with warnings on stderr; the TPU tests compile for topologies, which needs no probe.
if (importlib.util.find_spec("libtpu") is not None and not os.path.exists("/dev/accel0")
        and not os.path.exists("/dev/vfio")):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

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


# The slowest modules first (measured with --durations=0): under ``--dist loadfile`` each module
# runs on one worker (its module fixtures are built once, not once per worker), and a long module
# started last would leave the other worker idle at the end.
SLOW_FIRST = ("test_resilience", "test_sharding", "test_population", "test_benchmarks", "test_fedms", "test_cli",
              "test_engine", "test_compiling", "test_budgets", "test_docs")


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        name = item.path.stem
        return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)

    items[:] = [item for _, item in sorted(enumerate(items), key=lambda p: (rank(p[1]), p[0]))]
