"""The package's shape: no import cycles, per-unit aggregation, evaluation through placement,
batched evaluation inside a client, callbacks."""
from __future__ import annotations

import ast
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fed_helpers import tiny_config
from fedms_jax.federated import placement, server as srv
from fedms_jax.federated.types import ClientOutput, ServerState

PACKAGE = Path(__file__).parents[1] / "fedms_jax"


def _imports(path: Path) -> set[str]:
    """The fedms_jax modules a file imports, anywhere in it (a function-level import is a
    dependency too: a cycle through one is a cycle a reader has to untangle)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedms_jax"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("fedms_jax"))
    return out


def test_no_import_cycles():
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}
    # A package's __init__ importing its own submodules is how packages work, not a cycle.
    for m in graph:
        graph[m] = {i for i in graph[m] if not i.startswith(m + ".")}
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for n in sorted(graph[m]):
            visit(n, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])
    assert "fedms_jax.federated.rounds" in graph and "fedms_jax.algorithms.fedms" in graph


def test_the_layers_below_the_config_import_nothing_from_it():
    """Models, data, the engine (``federated``) and the protocol take plain values: none of their
    modules imports ``fedms_jax.config`` (the choices are ``fedms_jax.choices``, plain tuples)."""
    for sub in ("models", "data", "federated"):
        for path in (PACKAGE / sub).rglob("*.py"):
            bad = {i for i in _imports(path) if i == "fedms_jax.config" or i.startswith("fedms_jax.config.")}
            assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {sorted(bad)}"


def test_config_choices_are_what_the_code_implements():
    """fedms_jax.choices (no jax) lists the choices the config checks; the registries of the
    modules that implement them are keyed by the same names."""
    from fedms_jax import algorithms, config
    from fedms_jax.data import sources
    from fedms_jax.federated import placement, server, sharding
    from fedms_jax.models import lora, transformer

    assert set(config.ACTIVATIONS) == set(transformer._ACTIVATIONS)
    assert set(config.STRATEGIES) == set(sharding.RULES)
    assert tuple(algorithms.REGISTRY) == config.ALGORITHMS
    assert tuple(server.OPTIMIZERS) == config.SERVER_OPTIMIZERS
    assert tuple(placement.BACKENDS) == config.BACKENDS
    assert set(config.FILE_SOURCES) <= set(sources.SOURCES)
    assert lora.LORA_TARGETS is config.LORA_TARGETS
    assert set(config.TWO_STAGE) <= set(config.ALGORITHMS) and set(config.USES_SAL) <= set(config.ALGORITHMS)


def test_per_unit_aggregation_averages_each_unit_over_its_clients():
    """Numpy oracle: unit 'a' trained by clients 0, 1, 2 (weights 1, 2, 3); unit 'b' only by
    client 2; unit 'c' by nobody. The vmapped, chunked and sequential backends agree."""
    rng = np.random.default_rng(0)
    ups = {u: rng.normal(size=(4, 3)).astype(np.float32) for u in "abc"}
    w = {"a": np.array([1, 2, 3, 0], np.float32), "b": np.array([0, 0, 5, 0], np.float32),
         "c": np.zeros(4, np.float32)}

    def fn(_, client):
        return ClientOutput({u: client[u] for u in "abc"}, {u: client["w" + u] for u in "abc"}, {}, {})

    per_client = {**{u: jnp.asarray(v) for u, v in ups.items()}, **{"w" + u: jnp.asarray(v) for u, v in w.items()}}
    for backend in (placement.Vmap(), placement.Vmap(chunk_size=2), placement.Sequential()):
        run = (lambda f: jax.jit(f)) if backend.jitted else (lambda f: f)
        mean, totals, _, _ = run(lambda pc: backend.map_reduce(fn, None, pc))(per_client)
        np.testing.assert_allclose(mean["a"], (w["a"][:, None] * ups["a"]).sum(0) / 6, rtol=1e-6)
        np.testing.assert_allclose(mean["b"], ups["b"][2], rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(totals["c"]), 0.0)

    # FedAdam on the server: 'a' and 'b' move, 'c' (no client trained it) keeps its value and state.
    opt = optax.adam(0.1)
    trainable = {u: jnp.ones(3) for u in "abc"}
    server = srv.init_server(opt, trainable)
    assert isinstance(server, ServerState)
    new = srv.server_update(opt, server, mean, totals)
    assert np.abs(np.asarray(new.trainable["a"]) - 1).max() > 0 and np.abs(np.asarray(new.trainable["b"]) - 1).max() > 0
    np.testing.assert_array_equal(np.asarray(new.trainable["c"]), 1.0)
    for x, y in zip(jax.tree_util.tree_leaves(new.opt_state["c"]), jax.tree_util.tree_leaves(server.opt_state["c"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def trained():
    from fedms_jax.federated.rounds import sample_cohort
    from fedms_jax.run import build

    exp = build(tiny_config("algorithm=fedms", "stage1_rounds=1", "rounds=2"))
    server, clients = exp.init_states()
    for t in range(2):
        server, clients, _ = exp.engine.run_round(server, clients, t, exp.algorithm.phase(t), sample_cohort(0, t, 8, 8))
    return exp, server, clients


def test_evaluation_in_small_batches_equals_one_batch(trained):
    """A client's test split evaluated 3 examples at a time (padded, masked) gives the same sums
    as in one batch; so does the global evaluation."""
    exp, server, clients = trained
    phase = exp.algorithm.phase(1)
    engine = exp.engine
    assert exp.client_test.labels.shape[1] > 3
    whole = engine.evaluate_clients(server, clients, phase, exp.client_test)
    g_whole = engine.evaluate_global(server, phase, exp.test_images, exp.test_labels)
    engine.eval_batch = 3  # a new program (the sizes are part of its key), not the cached one
    try:
        small = engine.evaluate_clients(server, clients, phase, exp.client_test)
        g_small = engine.evaluate_global(server, phase, exp.test_images, exp.test_labels)
    finally:
        engine.eval_batch = 256
    np.testing.assert_array_equal(small["correct"], whole["correct"])
    np.testing.assert_allclose(small["nll"], whole["nll"], rtol=1e-5)
    np.testing.assert_allclose(small["gate_local"], whole["gate_local"], rtol=1e-5)
    assert g_small[1] == g_whole[1]
    np.testing.assert_allclose(g_small[0], g_whole[0], rtol=1e-5)


def test_callbacks_see_every_round(tmp_path):
    import json

    from fedms_jax.run import Callback, run

    class Recorder(Callback):
        def __init__(self):
            self.events = []

        def on_start(self, exp, start):
            self.events.append(("start", start))

        def on_round(self, end):
            self.events.append(("round", end.round, end.record["loss"]))

        def on_end(self):
            self.events.append(("end",))

    rec = Recorder()
    out = run(tiny_config("rounds=3", "eval_every=3"), tmp_path, progress=False, callbacks=[rec])
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rec.events == [("start", 0)] + [("round", l["round"], l["loss"]) for l in lines] + [("end",)]
    assert out.metrics == lines[-1] and "personalized_accuracy" in out.metrics
