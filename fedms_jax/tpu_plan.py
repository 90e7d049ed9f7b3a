"""``fedms-jax plan --topology``: every program of a run compiled for a TPU topology, on a host
with no TPU, and what each would cost there.

The run is built on this host as ``fedms-jax run`` would build it (data partitioned, backbone
made), then re-laid out, as shapes only, over the topology's devices (``tpu.mesh``) for each
layout (``plan.Layout``: clients x model and a strategy). Every program the run would compile
(``Experiment.programs``: the round program of each phase, the evaluation programs, and the
initial-state program) is lowered and compiled for that target. Per program and layout:

* per-device argument / output / temporary bytes (XLA:TPU's ``memory_analysis``) and their
  peak (arguments + temporaries + outputs - donated) against the device's HBM: fits or not;
* matmul FLOPs per device and the collectives (kind, count, bytes) per execution, loops
  counted as often as they run (``hlo.count``);
* compile seconds;
* for round programs, a roofline estimate of the round's time (``Roofline``).

``largest_cohort`` searches the clients per round whose heaviest round program still fits.
Nothing runs: the numbers are the compiler's and the chip's published specs (``tpu.CHIPS``).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import re
import time

import jax

from fedms_jax import hlo, plan, tpu
from fedms_jax.compiling import shapes
from fedms_jax.config import Config
from fedms_jax.federated import sharding
from fedms_jax.federated.placement import replicated

MB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Roofline:
    """An estimate of one execution's time on the target, from the compiled program and the
    chip's peak numbers; every term assumes the chip runs at its peak:

    * compute: matmul FLOPs per device / peak bf16 FLOP/s per device;
    * memory: the program's HBM traffic per device, walked over its top-level instructions
      with loops counted (``hlo.hbm_traffic``: each fusion's operands and result) / the HBM
      bandwidth per device;
    * collectives: their result bytes per device (an all-reduce twice: a reduce-scatter then an
      all-gather) / the ICI bandwidth per device, not overlapped with compute; over several
      slices the data-centre network is slower, which this does not model.

    ``seconds`` = max(compute, memory) + collectives."""

    compute_s: float
    memory_s: float
    collective_s: float

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s) + self.collective_s


def roofline(counts: hlo.Counts, topo: tpu.Topology) -> Roofline:
    per_device = lambda per_chip: per_chip / topo.chip.devices_per_chip
    moved = sum(b * (2.0 if kind == "all-reduce" else 1.0) for kind, (_, b) in counts.collectives.items())
    return Roofline(counts.matmul_flops / topo.device_flops, counts.hbm_bytes / per_device(topo.chip.hbm_bandwidth),
                    moved / per_device(topo.chip.ici_bandwidth))


def _name(kind: str, phase) -> str:
    return f"{kind} (stage {phase.stage}, k={phase.num_active})" if phase is not None else kind


def compile_row(key_name: str, lower, topo: tpu.Topology, cohort: int | None) -> dict:
    """Lowers and compiles one program; its row of numbers (see the module docstring)."""
    t0 = time.perf_counter()
    lowered = lower()
    t1 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return {**_not_fitting(key_name, str(e), topo, cohort, time.perf_counter() - t0), "lower_s": t1 - t0}
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    counts = hlo.count(compiled.as_text())
    peak = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    row = dict(program=key_name, arguments_mb=mem.argument_size_in_bytes / MB, outputs_mb=mem.output_size_in_bytes / MB,
               temporaries_mb=mem.temp_size_in_bytes / MB, peak_mb=peak / MB, hbm_mb=topo.device_hbm / MB,
               fits=bool(peak <= topo.device_hbm), gflops=counts.matmul_flops / 1e9, hbm_gb=counts.hbm_bytes / 1e9,
               collectives={k: {"count": c, "mb": b / MB} for k, (c, b) in sorted(counts.collectives.items())},
               collective_mb=counts.collective_bytes / MB, unknown_loops=counts.unknown_loops, compile_s=seconds,
               lower_s=t1 - t0)
    if cohort is not None:
        est = roofline(counts, topo)
        row.update(cohort=cohort, compute_s=est.compute_s, memory_s=est.memory_s, collective_s=est.collective_s,
                   round_s=est.seconds, clients_per_s=cohort / est.seconds if est.seconds > 0 else float("inf"))
    return row


def _not_fitting(key_name: str, message: str, topo: tpu.Topology, cohort: int | None, seconds: float) -> dict:
    """The row of a program XLA:TPU refused for lack of HBM: what it said it needed (its
    "total memory required for HLO temporaries (135.50G) exceeds available HBM (15.75G)")."""
    first = next((line.strip() for line in message.splitlines() if "RESOURCE_EXHAUSTED" in line), message.strip())
    first = first[first.index("RESOURCE_EXHAUSTED"):]
    needed = re.search(r"required[^(]*\(([\d.]+)([KMGT])\)", first)
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    peak = float(needed.group(1)) * scale[needed.group(2)] if needed else float("nan")
    row = dict(program=key_name, fits=False, error=first, peak_mb=peak / MB, hbm_mb=topo.device_hbm / MB,
               arguments_mb=float("nan"), outputs_mb=float("nan"), temporaries_mb=peak / MB, gflops=float("nan"),
               collectives={}, collective_mb=float("nan"), unknown_loops=0, compile_s=seconds)
    if cohort is not None:
        row["cohort"] = cohort
    return row


def check_layout(layout: plan.Layout, topo: tpu.Topology, cohort: int, chunk: int | None) -> None:
    """One-line ``TopologyError`` for a layout the topology or the cohort does not divide."""
    n = len(topo.devices)
    if layout.strategy not in sharding.STRATEGIES:
        raise tpu.TopologyError(f"layout {layout}: strategy must be one of {list(sharding.STRATEGIES)}")
    if layout.clients * layout.model != n:
        raise tpu.TopologyError(f"layout {layout}: clients x model = {layout.clients * layout.model}, but {topo.name} "
                                f"has {n} devices")
    if layout.strategy == "replicated" and layout.model != 1:
        raise tpu.TopologyError(f"layout {layout}: the replicated strategy has no model axis (use {n}x1:replicated)")
    spans = layout.clients * (layout.model if layout.strategy == "fsdp" else 1)
    unit = chunk or cohort
    if cohort % unit or unit % spans:
        raise tpu.TopologyError(f"layout {layout}: {unit} clients per {'chunk' if chunk else 'round'} (cohort_size = "
                                f"{cohort}) do not divide over the {spans} devices of its client axis")


def default_layouts(n: int, max_model: int = 8) -> list[plan.Layout]:
    """replicated over every device, then fsdp and tensor with 2, 4, .. ``max_model`` chips on
    'model' (a ring of ICI neighbours)."""
    out = [plan.Layout(n, 1, "replicated")]
    model = 2
    while model <= min(max_model, n):
        if n % model == 0:
            out += [plan.Layout(n // model, model, s) for s in ("fsdp", "tensor")]
        model *= 2
    return out


def plan_topology(config: Config, topology: str, layouts: list[plan.Layout] | None = None, *,
                  programs: str = "all", cohorts: list[int] | None = None, search: bool = False,
                  log=None, jobs: int = 0) -> dict:
    """Compiles the run's programs for ``topology`` under each layout (default:
    ``default_layouts``). ``programs``: 'all' (every program of the run) or 'round' (the round
    program of the last phase: stage 2 when there is one, the most blocks active).
    ``cohorts``: more clients per round to compile that round program for; ``search``: find the
    largest that fits (``largest_cohort``). ``jobs``: layouts compiled at once, in threads (XLA
    compiles outside the GIL; 0: one per CPU core). Returns ``{"topology": ..., "rows": [...]}``,
    the rows in the order of ``layouts``."""
    from fedms_jax.run import build

    log = log or (lambda _: None)
    topo = tpu.topology(topology)
    layouts = layouts or default_layouts(len(topo.devices))
    chunk = config.placement.chunk_size or None
    for layout in layouts:
        check_layout(layout, topo, config.cohort_size, chunk)
    t0 = time.perf_counter()
    exp = build(plan.one_chunk(config) if chunk is None else config,
                mesh=sharding.make_mesh(devices=jax.devices()[:1]))
    log(f"built the run on this host in {time.perf_counter() - t0:.1f} s")
    server, clients = exp.states_like()
    wanted = exp.programs(server, clients)
    last = exp.algorithm.phase(config.rounds - 1)
    if programs == "round":
        wanted = [w for w in wanted if w[0] == "round" and w[1] == last]
    head = dict(topology=topo.name, chip=topo.chip.generation, devices=len(topo.devices), chips=topo.chips,
                hosts=topo.hosts, device_hbm_mb=topo.device_hbm / MB, source=topo.chip.source,
                algorithm=config.algorithm, cohort_size=config.cohort_size, population=exp.mode,
                backbone_params=exp.backbone_params)
    jobs = max(1, min(len(layouts), jobs or os.cpu_count() or 1))
    with _no_persistent_cache(), concurrent.futures.ThreadPoolExecutor(jobs, thread_name_prefix="plan") as pool:
        parts = list(pool.map(
            lambda layout: _layout_rows(exp, layout, topo, wanted, last, chunk, programs, cohorts, search, log), layouts))
    return {**head, "rows": [row for part in parts for row in part]}


@contextlib.contextmanager
def _no_persistent_cache():
    """JAX's persistent compilation cache off: an executable for devices that are not attached
    cannot be read back (libtpu: "PjRtCompiler must be constructed with a Client"), so an entry
    written for one would only be a warning on the next read."""
    from jax._src import compilation_cache

    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        compilation_cache.reset_cache()


def _layout_rows(exp, layout, topo, wanted, last, chunk, programs, cohorts, search, log) -> list[dict]:
    config, rows = exp.config, []
    engine = exp.engine.with_layout(tpu.mesh(topo, layout.clients, layout.model), layout.strategy,
                                    abstract=True, chunk_size=chunk)
    base = dict(layout=str(layout), backbone_mb=sharding.shard_bytes(engine.backbone, engine.mesh, layout.strategy) / MB)
    refused = run_refuses(config, layout)
    if refused:  # compiled all the same (what it would cost), and said
        base["run_refuses"] = refused
        log(f"{layout}: fedms-jax run refuses it: {refused}")
    if programs == "all":
        key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated(engine.mesh))
        n = 1 if exp.streamed else config.data.num_clients
        init = jax.jit(exp.algorithm.init, static_argnums=1, out_shardings=replicated(engine.mesh))
        rows.append({**base, **compile_row("init", lambda: init.lower(key, n), topo, None)})
        log(f"{layout}: init")
    for kind, phase, *args in wanted:
        _, lower = engine.lowering(kind, phase, *[a if isinstance(a, int) else shapes(a) for a in args])
        row = compile_row(_name(kind, phase), lower, topo, config.cohort_size if kind == "round" else None)
        rows.append({**base, **row})
        log(f"{layout}: {row['program']} {row['compile_s']:.1f} s ({row['lower_s']:.1f} s tracing and lowering)")
    for m in cohorts or []:
        rows.append({**base, **round_row(exp, engine, last, m, topo)})
    if search:
        best = largest_cohort(exp, engine, last, topo, chunk, log=log)
        rows.append({**base, "program": "largest cohort that fits", **best})
        log(f"{layout}: largest cohort {best['largest_cohort']} ({best['compiles']} compiles)")
    return rows


def run_refuses(config: Config, layout: plan.Layout) -> str | None:
    """Why ``fedms-jax run`` would refuse ``config`` on ``layout`` (``config.validate``'s
    message, e.g. a known bug's guard), or None."""
    from fedms_jax.config import ConfigError, validate

    mesh = dataclasses.replace(config.mesh, clients=layout.clients, model=layout.model, strategy=layout.strategy)
    try:
        validate(dataclasses.replace(config, mesh=mesh))
    except ConfigError as e:
        return str(e)
    return None


def round_row(exp, engine, phase, cohort: int, topo: tpu.Topology) -> dict:
    """The round program at ``phase`` for ``cohort`` clients per round, compiled."""
    server, clients = exp.states_like()
    data = None
    if exp.streamed:  # the round takes the cohort's states and data: [cohort, ...]
        clients = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((cohort,) + x.shape[1:], x.dtype), clients)
        data = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((cohort,) + x.shape[1:], x.dtype), engine.data_like)
    lower = lambda: engine.lower_round(phase, server, clients, cohort, data)
    return compile_row(_name("round", phase), lower, topo, cohort)


def largest_cohort(exp, engine, phase, topo: tpu.Topology, chunk: int | None, limit: int = 1 << 20,
                   log=None) -> dict:
    """The most clients per round (a multiple of the client axis' devices, and of the chunk
    when there is one; at most the population for a device population, ``limit`` streamed)
    whose round program at ``phase`` fits the device's HBM.

    With a fixed chunk only the cohort's states, data and metrics grow with it, so the peak is
    nearly linear in the cohort: secant steps (the line through the last two compiles, where
    it crosses the HBM) close in on the edge in a few compiles (near it XLA:TPU squeezes its
    temporaries, and the line flattens), then galloping up from the largest cohort known to fit
    until one does not, and bisection between the two. Returns
    {largest_cohort, compiles, peak_mb_per_client (the last secant's slope)}; 0 if none fits."""
    log = log or (lambda _: None)
    step = chunk or engine.placement.num_devices
    cap = limit // step * step if exp.streamed else exp.config.data.num_clients // step * step
    hbm, peaks = topo.device_hbm, {}
    bounds = {"lo": 0, "hi": cap + step}  # lo fits (or is 0); hi does not (or is past the cap)

    def probe(m: int) -> float:
        value = round_row(exp, engine, phase, m, topo)["peak_mb"] * MB
        peaks[m] = value if value == value else float("inf")  # nan: refused, the size not said
        if peaks[m] <= hbm:
            bounds["lo"] = max(bounds["lo"], m)
        else:
            bounds["hi"] = min(bounds["hi"], m)
        log(f"  cohort {m}: peak {peaks[m] / MB:.0f} MB ({'fits' if peaks[m] <= hbm else 'does not fit'})")
        return peaks[m]

    slope, last = float("nan"), [step, min(cap, 4 * step)]
    if probe(step) > hbm:
        return dict(largest_cohort=0, compiles=len(peaks), peak_mb_per_client=slope)
    if last[1] > step:
        probe(last[1])
    for _ in range(8):  # secant steps
        (a, pa), (b, pb) = ((m, peaks[m]) for m in last)
        if b == a or pb == float("inf") or pb <= pa or bounds["hi"] - bounds["lo"] <= step:
            break
        slope = (pb - pa) / (b - a)
        guess = int(b + (hbm - pb) / slope) // step * step
        guess = min(max(guess, bounds["lo"] + step), bounds["hi"] - step)
        if guess in peaks:
            break
        probe(guess)
        last = [b, guess]
    gap = step  # nothing known not to fit yet: gallop up from the largest that does
    while bounds["hi"] > cap and bounds["lo"] < cap:
        probe(min(bounds["lo"] + gap, cap))
        gap *= 2
    lo, hi = bounds["lo"], bounds["hi"]
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if probe(mid) <= hbm else (lo, mid)
    return dict(largest_cohort=lo, compiles=len(peaks), peak_mb_per_client=slope / MB if slope == slope else slope)


def table(result: dict) -> str:
    """The rows as a markdown table, under a line describing the target."""
    r = result
    out = [f"{r['topology']}: {r['chips']} {r['chip']} chips, {r['devices']} devices, {r['hosts']} hosts, "
           f"{r['device_hbm_mb'] / 1024:.1f} GiB HBM per device ({r['source']}); {r['algorithm']}, "
           f"{r['cohort_size']} clients per round, {r['population']} population; per device:", "",
           "| layout | program | fits | peak MB | arguments MB | temporaries MB | GFLOP | collectives (count, MB) "
           "| compile s | est. round s (compute / HBM / collectives) | clients/s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        if "largest_cohort" in row:
            out.append(f"| {row['layout']} | largest cohort that fits | {row['largest_cohort']} | | | | | | | | |")
            continue
        coll = ", ".join(f"{k} {v['count']:.0f}x {v['mb']:.1f}" for k, v in row["collectives"].items()) or "none"
        if "error" in row:
            coll = "refused by XLA:TPU: out of HBM"
        est = (f"{row['round_s']:.3g} ({row['compute_s']:.3g} / {row['memory_s']:.3g} / {row['collective_s']:.3g}) "
               f"| {row['clients_per_s']:.4g}" if "round_s" in row else " | ")
        name = row["program"] + (f", {row['cohort']} clients" if "cohort" in row and row["cohort"] != r["cohort_size"] else "")
        if row.get("run_refuses"):
            name += " (run refuses this layout)"
        out.append(f"| {row['layout']} | {name} | {'yes' if row['fits'] else 'NO'} | {row['peak_mb']:.1f} "
                   f"| {row['arguments_mb']:.1f} | {row['temporaries_mb']:.1f} | {row['gflops']:.4g} | {coll} "
                   f"| {row['compile_s']:.1f} | {est} |")
    return "\n".join(out)
