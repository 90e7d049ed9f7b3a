"""FedMS's two experts (DESIGN.md section 1, issue 25), each against a hand-computed oracle: the
label prior (balanced softmax, the client's log prior added when serving, never uploaded), the
global expert trained in stage 2 on the local expert's slice (its upload = FedAvg's SGD step on
that slice), the local expert trained from stage 1 on (= Ditto's personal update), the rotating
held-out slice, and the local expert trained through the mixture (APFL's gradient)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fed_helpers import flat, tiny_config
from fedms_jax.algorithms.fedms import (
    COUNTS, GATE, balanced_cross_entropy, label_counts, local_mixture_loss, log_prior,
)
from fedms_jax.federated import client as cl
from fedms_jax.federated.types import join_units, replace_units, select, split_units
from fedms_jax.run import build

LR = 0.1  # tiny_config: SGD


def _one_client(*extra):
    """A tiny FedMS run whose batch is a client's padded size, and client 0's round inputs."""
    probe = build(tiny_config("algorithm=fedms", *extra))
    max_n = probe.engine.data.images.shape[1]
    b = build(tiny_config("algorithm=fedms", f"client.batch_size={max_n}", "client.epochs=1", *extra))
    server, clients = b.init_states()
    phase = b.algorithm.phase(0)
    one = jax.tree_util.tree_map(lambda v: v[0], b.engine.gather(b.engine.data, clients, jnp.zeros((1,), jnp.int32), jnp.zeros((), jnp.int32)))
    return b, server, phase, one


def _grad(b, units, x, y, log_pi=None, full=None):
    """Gradient in ``units`` (the active units; the rest of the expert from ``full``) of the mean
    cross-entropy of ``logits (+ log_pi)`` over the examples x, y."""
    expert, backbone = b.settings.expert, b.engine.backbone

    def loss(t):
        z = expert.logits(backbone, t if full is None else replace_units(full, t), x, expert.num_layers)
        return optax.softmax_cross_entropy_with_integer_labels(z if log_pi is None else z + log_pi, y).mean()

    return jax.grad(loss)(units)


def _sgd(tree, grad):
    return jax.tree_util.tree_map(lambda p, g: p - LR * g, tree, grad)


def test_balanced_softmax_and_prior_by_hand():
    """counts of labels [0, 0, 2, 0, 1] with the 4th masked out: [2, 1, 1]; add-1 smoothing
    gives pi = [3, 2, 2] / 7; the loss is the cross-entropy of z + log pi."""
    labels, mask = jnp.asarray([0, 0, 2, 0, 1]), jnp.asarray([1, 1, 1, 0, 1])
    counts = label_counts(labels, mask, 3)
    np.testing.assert_array_equal(np.asarray(counts), [2, 1, 1])
    lp = log_prior(counts, 1.0)
    np.testing.assert_allclose(np.asarray(lp), np.log(np.asarray([3, 2, 2]) / 7), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(log_prior(jnp.zeros(3), 1.0)), np.log(np.full(3, 1 / 3)), rtol=1e-6)
    z = np.asarray([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0]], np.float32)
    y = np.asarray([0, 2])
    adj = z + np.log(np.asarray([3, 2, 2]) / 7)
    expected = np.mean([-(adj[i, y[i]] - np.log(np.exp(adj[i]).sum())) for i in range(2)])
    np.testing.assert_allclose(float(balanced_cross_entropy(jnp.asarray(z), lp, jnp.asarray(y))), expected, rtol=1e-6)


@pytest.fixture(scope="module")
def stage1():
    """A stage-1 FedMS client (local expert from stage 1, Ditto's prox lam = 0.7)."""
    return _one_client("rounds=3", "stage1_rounds=1", "fedms.local_prox=0.7")


def test_stage1_local_expert_is_dittos_personal_update(stage1):
    """One full batch, a local expert v0 != the received global w0, the client's prior pi from
    its label counts (add-1): w1 = w0 - lr dBCE(w0) (balanced softmax), v1 = v0 - lr (dCE(v0) +
    lam (v0 - w0)); the upload is w1 - w0 and v1 stays on the client."""
    b, server, phase, one = stage1
    assert phase.stage == 1
    stage = b.algorithm.stage(phase)
    w0 = stage.broadcast(server, phase)
    v0 = jax.tree_util.tree_map(lambda p: p + 0.05 * jnp.cos(jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape)), w0)
    one = {**one, "state": {**one["state"], "ready": jnp.ones((), bool), "expert": replace_units(one["state"]["expert"], v0)}}
    out = b.engine.client_fn(phase)((b.engine.backbone, w0), one)
    n = int(one["count"])
    x, y = b.settings.prep(one["images"])[:n], one["labels"][:n]
    pi = np.bincount(np.asarray(y), minlength=b.settings.expert.num_classes) + 1.0
    full = server.trainable  # SAL at k = 1: the blocks below are inactive (zero LoRA)
    w1 = _sgd(w0, _grad(b, w0, x, y, jnp.log(pi / pi.sum()), full))
    v1 = jax.tree_util.tree_map(lambda p, g, w: p - LR * (g + 0.7 * (p - w)), v0, _grad(b, v0, x, y, full=full), w0)
    np.testing.assert_allclose(flat(join_units(dict(out.upload))), flat(w1) - flat(w0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(flat(select(out.state["expert"], list(split_units(v0)))), flat(v1), rtol=1e-4, atol=1e-6)


def test_the_label_prior_stays_on_the_client(stage1):
    """The client's label counts are in its state (= its real labels' histogram), and nothing
    the client uploads carries them: the upload is exactly the server's trainable units."""
    b, server, phase, one = stage1
    stage = b.algorithm.stage(phase)
    out = b.engine.client_fn(phase)((b.engine.backbone, stage.broadcast(server, phase)), one)
    n, C = int(one["count"]), b.settings.expert.num_classes
    np.testing.assert_array_equal(np.asarray(out.state[COUNTS]), np.bincount(np.asarray(one["labels"][:n]), minlength=C))
    assert set(out.upload) <= set(split_units(server.trainable))
    paths = lambda tree: [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    assert paths(out.upload) and not any(COUNTS in p for p in paths(out.upload) + paths(server.trainable))


def test_stage2_global_upload_is_fedavg_on_the_training_slice():
    """Stage 2 with ``train_global`` and the held-out slice (prior none): the global expert's
    upload = one SGD step of FedAvg on the client's training slice (its examples outside the
    held-out slice), the gate and the local expert's losses add nothing to it; the local
    expert, starting from the received global one with its own loss, takes the same step."""
    b, server, phase, one = _one_client("stage1_rounds=0", "sal.mode=all", "fedms.prior=none")
    assert phase.stage == 2
    stage = b.algorithm.stage(phase)
    down = stage.broadcast(server, phase)
    out = b.engine.client_fn(phase)((b.engine.backbone, down), one)
    count, max_n = int(one["count"]), one["images"].shape[0]
    s = cl.Sampler(b.settings, stage.holdout, one["count"], max_n, one["key"], one["split_key"],
                   one["participation"], stage.rotate_holdout)
    held = int(s.held)
    assert held > 0
    order, offset = np.asarray(s.order), int(s.offset)
    train = order[(offset + held + np.arange(count - held)) % count]
    w0 = down["global"]
    w1 = _sgd(w0, _grad(b, w0, b.settings.prep(one["images"])[train], one["labels"][train]))
    glob = {u: d for u, d in out.upload.items() if u != GATE}
    np.testing.assert_allclose(flat(join_units(glob)), flat(w1) - flat(w0), rtol=1e-4, atol=1e-6)
    # (Both experts start equal here, so the mixture does not depend on the gate: its upload is 0.)
    np.testing.assert_array_equal(flat(out.upload[GATE]), 0.0)
    np.testing.assert_allclose(flat(select(out.state["expert"], list(split_units(w0)))), flat(w1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rotate", [True, False])
def test_rotating_held_out_slice_covers_every_example(rotate):
    """13 examples, a held-out fraction 0.25 (3): with rotation the slices of consecutive
    participations are disjoint (every example is in the local expert's training part within
    any 2 participations) and ceil(13 / 3) = 5 participations hold out every example once
    (the gate sees all of them); without rotation the same 3 are held out every time."""
    import types as pytypes

    count, max_n = 13, 16
    settings = pytypes.SimpleNamespace(batch_size=16, epochs=1, local_steps=1)
    held = []
    for p in range(5):
        s = cl.Sampler(settings, 0.25, jnp.asarray(count), max_n, jax.random.key(p), jax.random.key(7),
                       jnp.asarray(p), rotate)
        idx, mask = s.batch(jnp.asarray(0))
        trained = set(np.asarray(idx)[np.asarray(mask) > 0].tolist())
        assert len(trained) == count - 3
        held.append(set(range(count)) - trained)
    assert all(len(h) == 3 for h in held)
    if rotate:
        assert all(not (held[p] & held[p + 1]) for p in range(4))
        assert set().union(*held) == set(range(count))
    else:
        assert all(h == held[0] for h in held)


def test_mixture_trained_local_expert_gradient_by_hand():
    """2 classes, probability mixing: loss = mean_i -log(w_g s(z_g)_y + w_l s(z_l)_y). Its
    gradient in z_l is -(1/n) (w_l / p_y) s_l,y (e_y - s_l); none flows into w or z_g."""
    w = np.asarray([[0.3, 0.7], [0.6, 0.4], [0.5, 0.5]], np.float32)
    z_g = np.asarray([[2.0, -1.0], [0.0, 1.0], [0.3, 0.2]], np.float32)
    z_l = np.asarray([[-0.5, 0.5], [1.5, 0.0], [0.0, -2.0]], np.float32)
    y = np.asarray([1, 0, 1])
    soft = lambda z: np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    s_g, s_l = soft(z_g), soft(z_l)
    p_y = w[:, 0] * s_g[np.arange(3), y] + w[:, 1] * s_l[np.arange(3), y]
    onehot = np.eye(2)[y]
    expected = -(w[:, 1] / p_y * s_l[np.arange(3), y])[:, None] * (onehot - s_l) / 3
    f = lambda w_, zg, zl: local_mixture_loss(w_, zg, zl, jnp.asarray(y), "probs")
    np.testing.assert_allclose(float(f(*map(jnp.asarray, (w, z_g, z_l)))), np.mean(-np.log(p_y)), rtol=1e-6)
    gw, gg, gl = jax.grad(f, argnums=(0, 1, 2))(*map(jnp.asarray, (w, z_g, z_l)))
    np.testing.assert_allclose(np.asarray(gl), expected, rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(gw)).max() == 0 and np.abs(np.asarray(gg)).max() == 0
