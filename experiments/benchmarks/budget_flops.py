"""Budget-aware SAL: each tier's training FLOPs per round, measured against the prediction.

    python experiments/benchmarks/budget_flops.py [--config embedded] \
        --config.sal.budgets=1,2,4 --config.sal.budget_shares=0.25,0.25,0.5 [--config.KEY=VALUE ...]

For every distinct phase (stage, k) of the run it prints, per budget tier (``sal.budgets``), the
tier's level ``min(k, b)``, its clients per round, the **predicted** FLOPs of the tier in a
round (clients x one client's FLOPs at that level: ``accounting.tier_flops``, from
``accounting.client_flops``, XLA's cost analysis of one client compiled alone) and the
**measured** FLOPs of the group of tiers the round program runs at that level
(``accounting.group_flops``: the engine's ``train_group`` -- gather, broadcast at the level,
vmapped clients, weighted sums -- compiled alone over the group's clients). Both correct XLA's
count of a ``scan`` body (once) to the local steps the same way. Nothing is trained.
"""
from __future__ import annotations

import sys

from fedms_jax.config import resolve
from fedms_jax.federated import accounting
from fedms_jax.run import build


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    if "-h" in rest or "--help" in rest:
        print(__doc__)
        return
    name = rest[rest.index("--config") + 1] if "--config" in rest else "embedded"
    config = resolve(name, overrides)
    exp = build(config)
    if exp.resources is None:
        raise SystemExit("set --config.sal.budgets=... (this measures budget tiers)")
    engine, algorithm = exp.engine, exp.algorithm
    server, clients = exp.init_states()
    m = config.cohort_size
    print(f"{name} with sal.budgets={config.sal.budgets} shares={exp.resources.shares} "
          f"({config.sal.budget_mode}): clients per round per tier {engine.tiers.counts}; "
          f"{config.client.local_steps} local steps of batch {config.client.batch_size}\n")
    print("| stage | k | tier budget | level | clients | predicted GFLOP / round | measured GFLOP / round (group) | measured / predicted |\n"
          "|---|---|---|---|---|---|---|---|")
    per_level: dict = {}
    for phase in algorithm.phases(config.rounds):
        predicted = accounting.tier_flops(engine, server, clients, phase, m, per_level)
        tiers = accounting.tier_phases(engine, phase, m)
        for group, measured in accounting.group_flops(engine, server, clients, phase, m):
            want = sum(predicted[i] for i in group.tiers)
            for j, i in enumerate(group.tiers):
                t = tiers[i]
                cells = (f"{measured / 1e9:.3f}", f"{measured / want:.4f}") if j == 0 else ("(same group)", "")
                print(f"| {phase.stage} | {phase.num_active} | {t.budget} | {t.phase.num_active} | {t.clients} "
                      f"| {predicted[i] / 1e9:.3f} | {cells[0]} | {cells[1]} |", flush=True)
    print("\nGFLOP of one client's round by level: " + ", ".join(
        f"stage {p.stage} level {p.num_active}: {f / 1e9:.4f}" for p, f in sorted(per_level.items())))


if __name__ == "__main__":
    main()
