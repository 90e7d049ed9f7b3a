"""Local training: epochs without replacement, masked batches, held-out slices, persistent
optimizer state, segments (FedRep) and Ditto, each against a hand-computed oracle; and the
FedMS gate: content-aware input, experts untouched by the gate's loss, routing on content."""
from __future__ import annotations

import types as pytypes

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fed_helpers import flat, tiny_config
from fedms_jax import mofm
from fedms_jax.federated import ops
from fedms_jax.federated.protocol import Batch, Features, Stage
from fedms_jax.federated import client as cl
from fedms_jax.federated.types import Phase
from fedms_jax.models.vision import Branch
from fedms_jax.run import build


def _settings(epochs=0, steps=3, batch=4, optimizer=None):
    """The fields of ``Settings`` the client trainer reads."""
    return pytypes.SimpleNamespace(
        client_optimizer=optimizer or optax.sgd(0.1), batch_size=batch, epochs=epochs, local_steps=steps,
        use_rng=False, lr_scale=None, cache_frozen=True, prep=lambda x: x)


@pytest.mark.parametrize("holdout", [0.0, 0.25])
def test_epochs_draw_each_training_example_exactly_e_times(holdout):
    """E epochs over a client with 13 real examples padded to 20, batches of 4: every training
    example is read exactly E times, padding and held-out examples never; held-out batches
    read only held-out examples."""
    epochs, count, max_n, b = 3, 13, 20, 4
    s = _settings(epochs=epochs, batch=b)
    sampler = cl.Sampler(s, holdout, jnp.asarray(count), max_n, jax.random.key(0), jax.random.key(1))
    steps = cl.num_steps(s, max_n)
    assert steps == epochs * 5
    idx, mask = jax.vmap(sampler.batch)(jnp.arange(steps))
    drawn = np.bincount(np.asarray(idx)[np.asarray(mask) > 0], minlength=max_n)
    held = int(sampler.held)
    order = np.arange(max_n) if sampler.order is None else np.asarray(sampler.order)
    train_ids, held_ids = order[held:count], order[:held]
    assert held == int(np.floor(holdout * count)) and sorted(order[:count]) == list(range(count))
    np.testing.assert_array_equal(drawn[train_ids], epochs)
    assert drawn[held_ids].sum() == 0 and drawn[count:].sum() == 0
    # Each epoch reads every training example once, in its first batches; then all-padding steps.
    per_epoch = np.asarray(mask).reshape(epochs, 5 * b).sum(1)
    np.testing.assert_array_equal(per_epoch, count - held)
    if holdout:
        h_idx, h_mask = jax.vmap(sampler.held_batch)(jnp.arange(steps))
        assert set(np.asarray(h_idx).ravel()) <= set(held_ids) and bool((h_mask == 1).all())


def _quadratic_stage(**fields):
    """A stage whose loss is the masked mean of ||w - x_i||^2 / 2 over the batch's examples
    (features are the examples themselves), plus ``b`` trained the same way."""

    def loss(params, ctx, backbone, batch, rng, phase):
        x = batch.features.branch.hidden
        per = 0.5 * jnp.sum(jnp.square(params["w"]["x"] - x), -1) + 0.5 * jnp.sum(jnp.square(params["b"]["x"] - 2 * x), -1)
        return ops.masked_mean(per, batch.mask), {}

    featurize = lambda backbone, ctx, x, phase: Features(Branch(hidden=x, cls=x))
    return Stage(None, None, featurize, loss, None, None, None, None, **fields)


def _client(x, count, seed=0):
    return {"images": x, "labels": jnp.zeros(x.shape[0], jnp.int32), "count": jnp.asarray(count),
            "key": jax.random.key(seed), "split_key": jax.random.key(99)}


def test_masked_last_batch_and_padding_steps_match_the_unpadded_oracle():
    """One epoch, batch 4, 6 real examples padded to 12: 2 real steps (4, then 2 masked to real
    ones) and a third all-padding step that must change nothing. Oracle: SGD by hand on the
    same batches of the unpadded data."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((12, 3)), jnp.float32)
    s = _settings(epochs=1, batch=4)
    params = {"w": {"x": jnp.zeros(3)}, "b": {"x": jnp.ones(3)}}
    stage = _quadratic_stage()
    new, _, _, _ = cl.local_train(stage, Phase(1, 1), s, None, params, None, _client(x, 6))
    sampler = cl.Sampler(s, 0.0, jnp.asarray(6), 12, jax.random.key(0), None)
    w, b = np.zeros(3), np.ones(3)
    for i in range(3):
        idx, mask = (np.asarray(a) for a in sampler.batch(jnp.asarray(i)))
        real = np.asarray(x)[idx[mask > 0]]
        if len(real) == 0:
            continue
        w, b = w - 0.1 * (w - real).mean(0), b - 0.1 * (b - 2 * real).mean(0)
    np.testing.assert_allclose(np.asarray(new["w"]["x"]), w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(new["b"]["x"]), b, rtol=1e-5, atol=1e-7)


def test_persistent_optimizer_state_continues_across_rounds():
    """Adam over two rounds of 3 steps with ``persistent=('w',)`` equals one run of 6 steps for
    ``w`` (its state carried), while ``b`` restarts its state each round."""
    x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 3)), jnp.float32)
    opt = optax.adam(0.05)
    stage = _quadratic_stage(persistent=("w",))
    params = {"w": {"x": jnp.zeros(3)}, "b": {"x": jnp.zeros(3)}}
    carried = ops.init_opt_states(opt, {"w": params["w"]})
    s3 = _settings(steps=3, batch=8, optimizer=opt)
    client = _client(x, 8)
    p1, o1, _, _ = cl.local_train(stage, Phase(1, 1), s3, None, params, None, client, carried)
    # Round two: the same batches again (same key), w's state carried, b's fresh.
    p2, o2, _, _ = cl.local_train(stage, Phase(1, 1), s3, None, p1, None, client, {"w": o1["w"]})
    # Batches are the full data (batch 8 of 8 with replacement is not the full data: use the
    # oracle on the very indices the sampler drew).
    sampler = cl.Sampler(s3, 0.0, jnp.asarray(8), 8, client["key"], None)
    batches = [np.asarray(x)[np.asarray(sampler.batch(jnp.asarray(i))[0])] for i in range(3)] * 2
    ref = lambda target, states_restart: _adam_oracle(batches, target, states_restart)
    np.testing.assert_allclose(np.asarray(p2["w"]["x"]), ref(1.0, False), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(p2["b"]["x"]), ref(2.0, True), rtol=1e-4, atol=1e-6)
    assert int(o2["w"]["x"][0].count) == 6 and int(o2["b"]["x"][0].count) == 3


def _adam_oracle(batches, scale, restart, lr=0.05, b1=0.9, b2=0.999, eps=1e-8):
    """numpy Adam on 0.5 ||p - scale x||^2 over the batches (restarting after 3 steps or not)."""
    p = np.zeros(3)
    m = v = np.zeros(3)
    t = 0
    for i, xb in enumerate(batches):
        if restart and i == 3:
            m = v = np.zeros(3)
            t = 0
        g = (p - scale * xb).mean(0)
        t += 1
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return p


# --- FedRep and Ditto against hand-computed updates --------------------------------------------
def _one_client(algorithm, *extra):
    """A tiny run's engine and client 0's round inputs (batch = its padded size, SGD lr 0.1)."""
    probe = build(tiny_config(f"algorithm={algorithm}", *extra))
    max_n = probe.engine.data.images.shape[1]
    b = build(tiny_config(f"algorithm={algorithm}", f"client.batch_size={max_n}", *extra))
    server, clients = b.init_states()
    phase = b.algorithm.phase(0)
    one = jax.tree_util.tree_map(lambda v: v[0], b.engine.gather(b.engine.data, clients, jnp.zeros((1,), jnp.int32), jnp.zeros((), jnp.int32)))
    return b, server, clients, phase, one


def _ce_grad(expert, backbone, trainable, x, y, count):
    """Gradient of the mean cross-entropy over the client's real examples."""
    def loss(t):
        logits = expert.logits(backbone, t, x[:count], expert.num_layers)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y[:count]).mean()

    return jax.grad(loss)(trainable)


def test_fedrep_trains_the_head_then_the_body():
    """2 epochs with one full batch each: step 0 trains the head (body fixed), step 1 the body
    with the new head. Hand-computed SGD: head' = head - lr dL/dhead(body, head); body' = body
    - lr dL/dbody(body, head'); the upload is body' - body, the head stays on the client."""
    b, server, clients, phase, one = _one_client("fedrep", "client.epochs=2", "fedrep.head_fraction=0.5")
    stage = b.algorithm.stage(phase)
    down = stage.broadcast(server, phase)
    out = b.engine.client_fn(phase)((b.engine.backbone, down), one)
    expert, backbone = b.settings.expert, b.engine.backbone
    x, y, n = b.settings.prep(one["images"]), one["labels"], int(one["count"])
    body, head = down["lora"], one["state"]["head"]
    head1 = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, head, _ce_grad(expert, backbone, {"lora": body, "head": head}, x, y, n)["head"])
    g_body = _ce_grad(expert, backbone, {"lora": body, "head": head1}, x, y, n)["lora"]
    body1 = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, body, g_body)
    np.testing.assert_allclose(flat(out.state["head"]), flat(head1), rtol=1e-4, atol=1e-6)
    upload = {"lora": {"encoder": {k: v for k, v in out.upload.items() if k.startswith("blocks_")}}}
    np.testing.assert_allclose(flat(upload), flat(body1) - flat(body), rtol=1e-4, atol=1e-6)
    assert "head" not in out.upload and set(out.state["opt"]) == {"head"}


def test_ditto_personal_model_is_pulled_toward_the_received_global_one():
    """One epoch, one full batch, a personal expert v0 != the global w0: hand-computed SGD,
    w1 = w0 - lr dCE(w0); v1 = v0 - lr (dCE(v0) + lam (v0 - w0)); upload w1 - w0."""
    lam = 0.7
    b, server, clients, phase, one = _one_client("ditto", "client.epochs=1", f"ditto.lam={lam}")
    stage = b.algorithm.stage(phase)
    down = stage.broadcast(server, phase)
    v0 = jax.tree_util.tree_map(lambda p: p + 0.05 * jnp.cos(jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape)), down)
    from fedms_jax.federated.types import replace_units

    one = {**one, "state": {**one["state"], "ready": jnp.ones((), bool), "expert": replace_units(one["state"]["expert"], v0)}}
    out = b.engine.client_fn(phase)((b.engine.backbone, down), one)
    expert, backbone = b.settings.expert, b.engine.backbone
    x, y, n = b.settings.prep(one["images"]), one["labels"], int(one["count"])
    w1 = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, down, _ce_grad(expert, backbone, down, x, y, n))
    gv = _ce_grad(expert, backbone, v0, x, y, n)
    v1 = jax.tree_util.tree_map(lambda p, g, w: p - 0.1 * (g + lam * (p - w)), v0, gv, down)
    from fedms_jax.federated.types import join_units, select, split_units

    np.testing.assert_allclose(flat(join_units(dict(out.upload))), flat(w1) - flat(down), rtol=1e-4, atol=1e-6)
    got_v = select(out.state["expert"], list(split_units(v0)))
    np.testing.assert_allclose(flat(got_v), flat(v1), rtol=1e-4, atol=1e-6)


# --- the FedMS gate ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fedms_client():
    """A FedMS stage-2 client of a tiny run (SAL at every block: k = L) with a trained-looking
    global expert."""
    from conftest import randomize_lora

    b = build(tiny_config("algorithm=fedms", "stage1_rounds=0", "sal.mode=all", "fedms.gate_rank=4"))
    server, clients = b.init_states()
    server = server.replace(trainable={**server.trainable, "lora": randomize_lora(server.trainable["lora"], jax.random.key(3), 0.3)})
    phase = b.algorithm.phase(0)
    one = jax.tree_util.tree_map(lambda v: v[0], b.engine.gather(b.engine.data, clients, jnp.zeros((1,), jnp.int32), jnp.zeros((), jnp.int32)))
    return b, server, phase, one


def test_gate_input_is_content_aware_at_k_equals_l(fedms_client):
    """Permuting an image's patches (every 4x4 patch moved) changes the global-feature gate
    input clearly, at k = L where the branch point is the patch embedding; the branch point's
    mean token hardly moves (it is a linear function of the mean patch)."""
    from fedms_jax.algorithms.fedms import gate_features, global_expert

    b, server, phase, one = fedms_client
    assert phase.num_active == b.settings.expert.num_layers
    stage = b.algorithm.stage(phase)
    _, ctx = stage.client_init(stage.broadcast(server, phase), one["state"], phase)
    x = b.settings.prep(one["images"][:4])
    p = 4
    n = x.shape[1] // p
    tiles = x.reshape(4, n, p, n, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(4, n * n, p, p, 3)
    perm = np.random.default_rng(0).permutation(n * n)
    shuffled = tiles[:, perm].reshape(4, n, n, p, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(x.shape)
    feats = lambda imgs: stage.featurize(b.engine.backbone, ctx, imgs, phase)
    rel = lambda a, c: float(jnp.abs(a - c).max() / jnp.abs(a).max())
    # The training global expert's pooled feature (what served_global hands the gate).
    g_of = lambda fe: global_expert(b.settings, b.engine.backbone, ctx["anchor"], fe.branch.hidden, phase)[0]
    g, g_perm = (gate_features(fe, "global_feature", g_of(fe)) for fe in (feats(x), feats(shuffled)))
    m, m_perm = (gate_features(feats(i), "mean") for i in (x, shuffled))
    assert rel(g, g_perm) > 1e-2, rel(g, g_perm)
    assert rel(m, m_perm) < 1e-4, rel(m, m_perm)


def test_gate_loss_leaves_both_experts_unchanged(fedms_client):
    """With the training batch all masked, the loss is the gate's alone: its gradient on the
    local expert and on the (training) global expert is exactly zero (stop_gradient), while the
    gate adapter and head get a gradient."""
    b, server, phase, one = fedms_client
    stage = b.algorithm.stage(phase)
    assert stage.holdout == 0.2
    params, ctx = stage.client_init(stage.broadcast(server, phase), one["state"], phase)
    # A local expert unlike the global one (else the gate has nothing to choose between).
    from conftest import randomize_lora

    local = {**params["local"], "lora": randomize_lora(params["local"]["lora"], jax.random.key(8), 0.3)}
    params = {**params, "local": local, "gate_head": randomize_lora(params["gate_head"], jax.random.key(9), 0.3)}
    x, y = b.settings.prep(one["images"][:6]), one["labels"][:6]
    f = stage.featurize(b.engine.backbone, ctx, x, phase)
    batch = Batch(f, y, jnp.zeros(6), held=Batch(f, y, jnp.ones(6)))
    grads = jax.grad(lambda p: stage.loss(p, ctx, b.engine.backbone, batch, None, phase)[0])(params)
    assert set(params) == {"local", "global", "adapter", "gate_head"}  # train_global: both experts train
    assert np.abs(flat(grads["local"])).max() == 0.0 and np.abs(flat(grads["global"])).max() == 0.0
    assert np.abs(flat(grads["adapter"])).max() > 0 and np.abs(flat(grads["gate_head"])).max() > 0


def test_learned_gate_routes_on_content_and_beats_both_experts():
    """Two groups of inputs, told apart by their content features: the global expert knows the
    classes of group 0 only, the local expert those of group 1 only. Trained with FedMS's gate
    objective (mixture NLL, experts fixed), the gate's weights differ by input and the mixture
    beats both experts."""
    rng = np.random.default_rng(0)
    n, d, c = 256, 16, 4
    group = rng.integers(0, 2, n)
    labels = jnp.asarray(rng.integers(0, c, n))
    content = rng.standard_normal((n, d)).astype(np.float32) + 3.0 * np.eye(d, dtype=np.float32)[group]
    onehot = np.asarray(jax.nn.one_hot(labels, c))
    noise = rng.standard_normal((n, c)).astype(np.float32)
    z_global = jnp.asarray(np.where(group[:, None] == 0, 4 * onehot, noise))  # knows group 0
    z_local = jnp.asarray(np.where(group[:, None] == 1, 4 * onehot, noise))  # knows group 1
    adapter, head = mofm.init_gate(jax.random.key(0), d, 4)
    params = {"adapter": adapter, "gate_head": head}
    x = jnp.asarray(content)

    def loss(p):
        w = mofm.gate_weights(p["adapter"], p["gate_head"], x, 4)
        return mofm.nll(mofm.mix(w, jax.lax.stop_gradient(z_global), jax.lax.stop_gradient(z_local)), labels)

    opt = optax.adam(0.05)
    state = opt.init(params)
    step = jax.jit(lambda p, s: (lambda g: (optax.apply_updates(p, opt.update(g, s, p)[0]), opt.update(g, s, p)[1]))(jax.grad(loss)(p)))
    for _ in range(200):
        params, state = step(params, state)
    w = np.asarray(mofm.gate_weights(params["adapter"], params["gate_head"], x, 4))[:, mofm.LOCAL]
    assert w[group == 1].mean() > 0.8 and w[group == 0].mean() < 0.2
    acc = lambda scores: float((np.asarray(scores).argmax(-1) == np.asarray(labels)).mean())
    mixed = mofm.mix(jnp.asarray(np.stack([1 - w, w], 1)), z_global, z_local)
    assert acc(mixed) > max(acc(z_global), acc(z_local)) + 0.2, (acc(mixed), acc(z_global), acc(z_local))
