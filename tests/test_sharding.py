"""2-D (clients x model) meshes and backbone sharding strategies, on 8 simulated CPU devices."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fed_helpers import flat, run_rounds, tiny_config
from fedms_jax.federated import sharding

HERE = Path(__file__).parent
ENV8 = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip(), "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(HERE)}
LAYOUTS = ["8x1_replicated", "2x4_fsdp", "4x2_fsdp", "2x4_tensor"]


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding") / "out.npz"
    r = subprocess.run([sys.executable, str(HERE / "sharding_worker.py"), str(out)], env=ENV8, cwd=HERE,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return np.load(out)


def test_every_layout_equals_one_device(eight_devices):
    assert int(eight_devices["num_devices"]) == 8
    refs = {t: flat(run_rounds(tiny_config("algorithm=fedms", "rounds=2", "stage1_rounds=1", *t), 2)[0].trainable)
            for t in ((), ("fedms.train_global=false",))}
    for name in LAYOUTS:
        ref = refs[("fedms.train_global=false",) if name.endswith("tensor") else ()]
        np.testing.assert_allclose(eight_devices[f"server_{name}"], ref, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("name, model", [("2x4_fsdp", 4), ("4x2_fsdp", 2), ("2x4_tensor", 4)])
def test_each_device_holds_one_model_th_of_the_split_backbone(eight_devices, name, model):
    total = int(eight_devices[f"total_bytes_{name}"])
    split = int(eight_devices[f"split_bytes_{name}"])
    assert int(eight_devices[f"split_dev0_{name}"]) * model == split
    per_device = eight_devices[f"device_bytes_{name}"]
    assert (per_device == per_device[0]).all()
    if name.endswith("fsdp"):  # fsdp splits every leaf
        assert split == total and int(per_device[0]) * model == total
    else:  # tensor: the blocks' matmul weights; embeddings, norms, row biases replicated
        assert int(per_device[0]) == split // model + (total - split)
        assert split > 0.85 * total
    replicated = eight_devices["device_bytes_8x1_replicated"]
    assert (replicated == total).all()


def test_fsdp_splits_the_cohort_over_the_whole_mesh(eight_devices):
    d = eight_devices
    for name in ("2x4_fsdp", "4x2_fsdp"):
        # Every device computes its own client (8 clients, 8 devices), not the 'model' group's.
        assert int(d[f"clients_per_device_{name}"]) == 1 and int(d[f"client_devices_{name}"]) == 8, name
        # No redundant work: replicated's FLOPs per device (before: +7% at 2x4, partial sums).
        assert float(d[f"flops_{name}"]) <= 1.001 * float(d["flops_8x1_replicated"]), name
        # Each block's weights are all-gathered inside the scanned encoder's loop, and nothing
        # activation-sized is reduced: the only all-reduces are replicated's (the aggregate).
        assert d[f"all-gather_in_loops_{name}"].size >= int(d["block_leaves"]), name
        assert d[f"all-reduce_{name}"].max() <= d["all-reduce_8x1_replicated"].max(), name
        assert f"all-to-all_{name}" not in d.files and f"collective-permute_{name}" not in d.files, name
    # tensor keeps the clients over 'clients' only: its 'model' groups split each client's matmuls.
    assert int(d["clients_per_device_2x4_tensor"]) == 4
    assert str(d["cohort4_tensor"]) == "ok"
    assert re.search(r"must be a multiple of the 8 devices on the mesh axes \('clients', 'model'\)", str(d["cohort4_fsdp"]))


def test_client_axes_and_layer_hooks():
    from fedms_jax.federated import placement

    assert sharding.client_axes("fsdp") == ("clients", "model")
    assert sharding.client_axes("tensor") == sharding.client_axes("replicated") == ("clients",)
    mesh = sharding.make_mesh()
    assert sharding.gather_layers(mesh, "fsdp") is None  # mesh.model = 1: nothing to gather
    assert sharding.gather_layers(mesh, "tensor") is None and sharding.gather_layers(mesh, "replicated") is None
    assert placement.make_placement("vmap", mesh, 4, "fsdp").axes == ("clients", "model")
    assert placement.make_placement("vmap", mesh).axes == placement.Vmap(mesh).axes == ("clients",)
    assert placement.Vmap(mesh, axes=("clients", "model")).num_devices == len(jax.devices())


def test_rule_tables():
    params = {"encoder": {"blocks_0": {"attn": {"q": {"kernel": np.zeros((8, 8)), "bias": np.zeros(8)},
                                                 "o": {"kernel": np.zeros((8, 8)), "bias": np.zeros(8)}},
                                        "ln1": {"scale": np.zeros(8)}}},
              "patch_embed": {"kernel": np.zeros((4, 4, 3, 8))}}
    t = sharding.partition_specs(params, "tensor", 4)
    b = t["encoder"]["blocks_0"]
    assert b["attn"]["q"]["kernel"] == P(None, "model") and b["attn"]["o"]["kernel"] == P("model", None)
    assert b["attn"]["o"]["bias"] == P() and b["ln1"]["scale"] == P() and t["patch_embed"]["kernel"] == P()
    f = sharding.partition_specs(params, "fsdp", 4)
    assert f["patch_embed"]["kernel"] == P(None, None, None, "model") and f["encoder"]["blocks_0"]["ln1"]["scale"] == P("model")
    with pytest.raises(ValueError, match=r"encoder/blocks_0/attn/o/kernel \(8, 8\) axis 0 is not divisible by mesh.model=3"):
        sharding.partition_specs(params, "tensor", 3)
    with pytest.raises(ValueError, match="mesh.strategy must be one of"):
        sharding.partition_specs(params, "zigzag")


def test_bad_mesh_config_is_a_config_error():
    from fedms_jax.config import ConfigError
    from fedms_jax.run import build

    with pytest.raises(ConfigError, match=r"mesh.model = 3 must divide the 1 devices"):
        build(tiny_config("mesh.model=3", "mesh.strategy=fsdp"))
    with pytest.raises(ConfigError, match=r"config.mesh.strategy = 'replicated'.*needs mesh.model=1"):
        tiny_config("mesh.model=2")


# ViT-B/32's width, heads, MLP, patch and input size, with 2 of its 12 blocks: what a layout does to
# a block does not depend on how many there are, and compiling 12 unrolled blocks three times
# took most of a minute of the suite.
VIT_B32 = ["model.hidden=768", "model.layers=2", "model.heads=12", "model.mlp_dim=3072", "model.image_size=224",
           "model.patch_size=32", "client.local_steps=1", "client.batch_size=2", "rounds=2", "stage1_rounds=1"]


def _vit_params(d: int, layers: int, mlp: int, patch: int, image: int) -> int:
    """Hand count: patch conv + cls + positions + final LN, and per block 4 biased d x d
    projections, the biased MLP and two LayerNorms."""
    embed = patch * patch * 3 * d + d + d + ((image // patch) ** 2 + 1) * d + 2 * d
    block = 4 * (d * d + d) + (d * mlp + mlp) + (mlp * d + d) + 4 * d
    return embed + layers * block


def test_plan_for_a_vit_b32_backbone():
    from fedms_jax.builders import build_expert
    from fedms_jax.config import apply_overrides, load_config, validate

    r = subprocess.run([sys.executable, "-m", "fedms_jax.cli", "plan", "--layouts", "8x1:replicated,2x4:fsdp,2x4:tensor",
                        *[f"--config.{o}" for o in VIT_B32]], env=ENV8, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout)
    rows = {m.group(1): m for m in re.finditer(
        r"\| (\S+) \| stage 2, k=1 \| ([\d.]+) \(of ([\d.]+)\) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|",
        r.stdout)}
    assert set(rows) == {"8x1:replicated", "2x4:fsdp", "2x4:tensor"}
    # The backbone's size, independently: the hand count (which gives ViT-B/32's 87,455,232 at
    # 12 blocks), in fp32.
    assert _vit_params(768, 12, 3072, 32, 224) == 87_455_232
    config = validate(apply_overrides(load_config("embedded"), VIT_B32))
    shapes = jax.eval_shape(lambda k: build_expert(config, [str(i) for i in range(10)], k).backbone, jax.random.key(0))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(shapes))
    assert n_params == _vit_params(768, 2, 3072, 32, 224)
    total_mb = n_params * 4 / 2**20
    for name, row in rows.items():
        assert float(row.group(3)) == pytest.approx(total_mb, abs=0.01)
    assert float(rows["8x1:replicated"].group(2)) == pytest.approx(total_mb, abs=0.01)
    assert float(rows["2x4:fsdp"].group(2)) == pytest.approx(total_mb / 4, abs=0.01)
    # Tensor: q, k, v, o, fc1, fc2 kernels and the q, k, v, fc1 biases split 4 ways, the rest
    # (embeddings, LayerNorms, o and fc2 biases) on every device.
    d, mlp = 768, 3072
    split = 2 * (4 * d * d + 3 * d + 2 * d * mlp + mlp)
    tensor_mb = (split / 4 + n_params - split) * 4 / 2**20
    assert float(rows["2x4:tensor"].group(2)) == pytest.approx(tensor_mb, abs=0.01)
    # XLA's arguments hold at least this device's backbone and the client states.
    for row in rows.values():
        assert float(row.group(5)) >= float(row.group(2)) + float(row.group(4)) - 0.01
