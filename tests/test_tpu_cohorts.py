"""Cohort sizes on TPU topologies compiled with no TPU attached (libtpu): FLOPs per round from the
TPU and the CPU compile of one program, a cohort too large for the chips, and the search for the
largest that fits. (A module of its own so that the test workers share the TPU compiles.)"""
from __future__ import annotations

import jax
import pytest
from tpu_helpers import needs_libtpu, tpu_config as _config

from fedms_jax import hlo, plan, tpu, tpu_plan


@needs_libtpu
def test_tpu_and_cpu_compiles_of_one_round_program_count_the_same_flops():
    config = _config("cohort_size=4", "data.num_clients=8")
    from fedms_jax.federated import sharding
    from fedms_jax.run import build

    exp = build(plan.one_chunk(config), mesh=sharding.make_mesh(devices=jax.devices()[:1]))
    server, clients = exp.states_like()
    phase = exp.algorithm.phase(config.rounds - 1)
    cpu = hlo.count(exp.engine.lower_round(phase, server, clients, 4).compile().as_text()).matmul_flops
    topo = tpu.topology("v5e:2x2")
    engine = exp.engine.with_layout(tpu.mesh(topo, 4, 1), "replicated", abstract=True, chunk_size=None)
    per_device = hlo.count(engine.lower_round(phase, server, clients, 4).compile().as_text()).matmul_flops
    assert per_device * 4 == pytest.approx(cpu, rel=0.10)


@needs_libtpu
def test_a_cohort_too_large_for_the_chips_is_reported_as_not_fitting():
    config = _config("model.image_size=224", "model.patch_size=16", "cohort_size=4", "data.num_clients=4096",
                     "data.min_examples=2", "population.mode=streamed")
    result = tpu_plan.plan_topology(config, "v5e:2x2", [plan.Layout(4, 1, "replicated")], programs="round",
                                    cohorts=[4096])
    small, huge = result["rows"]
    assert small["fits"] and small["cohort"] == 4
    # XLA:TPU refuses to compile it (RESOURCE_EXHAUSTED): the row says what it needed.
    assert not huge["fits"] and huge["cohort"] == 4096 and huge["peak_mb"] > huge["hbm_mb"] == 16 * 1024
    assert "HBM" in huge["error"] and "| NO |" in tpu_plan.table(result)


@needs_libtpu
def test_the_largest_cohort_search_finds_the_edge_of_the_hbm():
    """224 px images make each streamed client's data ~1.2 MB, so a v5e's 16 GiB holds some
    thousands of clients per device: 5% below the search's answer fits and 5% above does not,
    each compiled again here, and the secant steps got there in a dozen compiles at most. (FedAvg:
    the search does not depend on the algorithm, and its round program compiles in half FedMS's
    stage-2 time.)"""
    config = _config("model.image_size=224", "model.patch_size=16", "cohort_size=4", "data.num_clients=4",
                     "data.min_examples=2", "population.mode=streamed", "placement.chunk_size=4",
                     "algorithm=fedavg")
    from fedms_jax.federated import sharding
    from fedms_jax.run import build

    exp = build(config, mesh=sharding.make_mesh(devices=jax.devices()[:1]))
    topo = tpu.topology("v5e:2x2")
    engine = exp.engine.with_layout(tpu.mesh(topo, 4, 1), "replicated", abstract=True, chunk_size=4)
    phase = exp.algorithm.phase(config.rounds - 1)
    found = tpu_plan.largest_cohort(exp, engine, phase, topo, 4)
    m = found["largest_cohort"]
    assert m > 1000 and m % 4 == 0 and found["compiles"] <= 12
    # Compiled again here: within 5% of the edge (right at it XLA:TPU squeezes its temporaries,
    # and whether a cohort a step away fits is not stable from one compile to the next).
    assert tpu_plan.round_row(exp, engine, phase, int(0.95 * m) // 4 * 4, topo)["fits"]
    assert not tpu_plan.round_row(exp, engine, phase, int(1.05 * m) // 4 * 4, topo)["fits"]
