"""Where a W1 round's time goes: a jax.profiler trace summed per HLO op, and ablations.

    python experiments/benchmarks/profile_round.py [--k 12] [--steps 2] [--trace DIR] [--without attn,gelu,ln]

* The trace (``--trace DIR``, viewable in Perfetto / TensorBoard) of one round after a warm-up;
  the XLA:CPU thunk events are mapped back to their HLO instructions' ``op_name`` (block indices
  folded together) and summed, largest first. Dots that XLA:CPU hands to a thread pool end their
  event when queued, so dot times there are lower bounds: use the ablations for shares.
* ``--without``: the same round with parts of every block removed (the attention core
  softmax(QK^T)V, keeping the projections; the GELU; the LayerNorms), so the time they cost is
  the difference. This monkeypatches the model for this process only: a measuring tool, not a
  model variant.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import shutil
from pathlib import Path

if __name__ == "__main__":
    from fedms_jax.perf import configure_xla_cpu

    configure_xla_cpu()

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import workload  # experiments/benchmarks/workload.py, beside this script (on sys.path when run by its path)

from fedms_jax.federated import accounting
from fedms_jax.federated.types import Phase
from fedms_jax.models import transformer


def ablate(parts: list[str]) -> None:
    if "attn" in parts:
        def call(self, x, *, causal, use_lora, deterministic):
            d = x.shape[-1]
            dense = lambda name: transformer.LoRADense(d, lora=transformer._lora_for(self.lora, name), dtype=self.dtype, name=name)
            kw = dict(use_lora=use_lora, deterministic=deterministic)
            return dense("o")(dense("q")(x, **kw) + dense("k")(x, **kw) + dense("v")(x, **kw), **kw)

        transformer.Attention.__call__ = nn.compact(call)
    if "gelu" in parts:
        transformer._ACTIVATIONS["gelu"] = lambda x: x
    if "ln" in parts:
        class Identity(nn.Module):
            epsilon: float = 1e-6
            dtype: object = None

            @nn.compact
            def __call__(self, x):
                return x

        class Namespace:
            LayerNorm, Module, compact, Dropout = Identity, nn.Module, nn.compact, nn.Dropout

        transformer.nn = Namespace


def per_op(trace_dir: Path, hlo_text: str, top: int) -> list[tuple[float, str, str]]:
    meta = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = \S+ .*?op_name=\"([^\"]+)\"", line)
        if m:
            meta[m.group(1)] = m.group(2)
    path = sorted(glob.glob(str(trace_dir / "**" / "*.json.gz"), recursive=True))[-1]
    trace = json.load(gzip.open(path))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    total: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in meta:
            op = re.sub(r"blocks_\d+", "blocks_N", meta[e["name"]])
            total[(e["name"].split(".")[0], op)] += e["dur"] / 1e3
    return [(ms, kind, op) for (kind, op), ms in total.most_common(top)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=12)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--trace", default="", help="write a profiler trace here and print the per-op table")
    p.add_argument("--without", default="", help="comma-separated: attn, gelu, ln")
    p.add_argument("--top", type=int, default=30)
    a = p.parse_args()
    parts = [x for x in a.without.split(",") if x]
    ablate(parts)
    s = workload.FULL
    w = workload.make(s, s.w1_clients, a.steps, s.w1_batch)
    engine, phase = w.engine, Phase(1, a.k)
    flops = accounting.client_flops(engine, w.server, w.clients, phase) * s.w1_clients
    r = workload.timed_rounds(w, phase, a.repeats)
    print(f"W1 k={a.k}, {a.steps} steps, without {parts or 'nothing'}: {r['median']:.3f} s/round, "
          f"{flops / 1e9:.0f} GFLOP, {flops / r['median'] / 1e9:.0f} GFLOP/s, chunk {workload.chunk_size(engine)}")
    if a.trace:
        trace_dir = Path(a.trace)
        shutil.rmtree(trace_dir, ignore_errors=True)
        cohort = np.arange(s.w1_clients, dtype=np.int32)
        with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
            out = engine.run_round(w.server, w.clients, 99, phase, cohort)
            jax.block_until_ready(out)
        server, clients = out[0], out[1]
        hlo = engine.lower_round(phase, server, clients, len(cohort)).compile().as_text()
        for ms, kind, op in per_op(trace_dir, hlo, a.top):
            print(f"{ms:9.1f} ms  {kind[:26]:26s} {op[-100:]}")


if __name__ == "__main__":
    main()
