"""What a compiled program does per execution, read from its optimized HLO text
(``compiled.as_text()``): its collectives (kind, count, bytes) and its matmul FLOPs, with every
loop counted as often as it runs.

XLA's own ``cost_analysis()`` counts a ``while`` body once, whatever its trip count (checked on
XLA:CPU and XLA:TPU, jaxlib 0.10: a 10-step ``lax.scan`` of a matmul reports a tenth of its
FLOPs), and a round program is loops all the way down (local steps, chunks, scanned layers).
So here every computation gets a multiplier (how many times it runs per execution: a loop body
its caller's times the trip count) and each instruction counts that many times. A trip count is
XLA's ``known_trip_count`` where the backend records it (CPU, GPU), else read from the loop's
condition (``i < N`` with a constant N, the form ``lax.scan`` / ``fori_loop`` lower to); a loop
whose count neither gives counts once and is reported in ``unknown_loops``.

FLOPs are those of ``dot`` and ``convolution`` instructions (2 per multiply-add; in a
convolution only the kernel taps that meet input elements, not the holes of a dilated input):
a ViT's matmuls are nearly all of its FLOPs; elementwise work, softmax and norms are left out.

Memory traffic (``hbm_traffic``) is walked the same way, one top-level instruction at a time:
after fusion every instruction outside a fused computation reads its operands from memory and
writes its result there, and what happens inside a fusion stays on chip. So a fusion counts its
operands' and result's bytes, except that an operand it only slices (``dynamic-slice``, the
way a scanned layer reads its weights from the stacked array) counts the slices, and an
in-place ``dynamic-update-slice`` result counts the update. Caches, prefetch and the overlap of
one instruction's reads with another's writes are not modelled: this is the traffic a roofline
divides by the bandwidth.
"""
from __future__ import annotations

import dataclasses
import re
from collections import defaultdict

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")
_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1,
          "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
          "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_CALLEES = re.compile(r"\b(body|condition|calls|to_apply|called_computations|branch_computations)="
                      r"(\{[^}]*\}|%?[\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """The (dtype, dims) of every array in an HLO shape (a tuple's elements in order)."""
    out = []
    for dtype, dims in _ARRAY.findall(shape):
        if dtype in _BYTES:
            out.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
    return out


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape (a tuple: the sum of its elements)."""
    total = 0
    for dtype, dims in arrays(shape):
        n = 1
        for d in dims:
            n *= d
        total += n * _BYTES[dtype]
    return total


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str
    op: str
    rest: str  # operands and attributes


@dataclasses.dataclass
class Computation:
    name: str
    params: dict[str, str]  # parameter name -> shape
    instructions: list[Instruction]

    def shape_of(self, operand: str) -> str | None:
        operand = operand.lstrip("%")
        if operand in self.params:
            return self.params[operand]
        for ins in self.instructions:
            if ins.name == operand:
                return ins.shape
        return None


def parse(text: str) -> tuple[dict[str, Computation], str]:
    """The computations of an HLO module's text, and the entry computation's name."""
    comps: dict[str, Computation] = {}
    entry, current = "", None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                params = {}
                for p in re.finditer(r"([\w.\-]+):\s*((?:\([^)]*\))|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)", m.group(2)):
                    params[p.group(1)] = p.group(2)
                current = Computation(m.group(1), params, [])
                if line.startswith("ENTRY"):
                    entry = current.name
            continue
        if line.startswith("}"):
            comps[current.name] = current
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            current.instructions.append(Instruction(m.group(1), m.group(2), m.group(3), m.group(4)))
    return comps, entry


def _trip_count(ins: Instruction, comps: dict[str, Computation]) -> int | None:
    m = _TRIP.search(ins.rest)
    if m:
        return int(m.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", ins.rest)
    comp = comps.get(cond.group(1)) if cond else None
    if comp is None:
        return None
    constants = {i.name: int(v.group(1)) for i in comp.instructions if i.op == "constant"
                 for v in [re.match(r"(-?\d+)\)", i.rest)] if v}
    bounds = []
    for i in comp.instructions:
        if i.op == "compare" and "direction=LT" in i.rest:
            operands = re.findall(r"%([\w.\-]+)", i.rest.split(")")[0])
            bounds += [constants[o] for o in operands[1:] if o in constants]
    return bounds[0] if len(bounds) == 1 else None


@dataclasses.dataclass
class Counts:
    """Per execution of the program: ``collectives`` {kind: (count, bytes)} (bytes: the
    results' sizes, per device), ``matmul_flops`` per device, ``static`` {kind: instructions in
    the text}, ``unknown_loops``: loops whose trip count could not be read (counted once), and
    ``hbm_bytes``: memory traffic per device (``hbm_traffic``)."""

    collectives: dict[str, tuple[float, float]]
    static: dict[str, int]
    matmul_flops: float
    unknown_loops: int
    hbm_bytes: float = 0.0

    @property
    def collective_bytes(self) -> float:
        return sum(b for _, b in self.collectives.values())


def multipliers(comps: dict[str, Computation], entry: str) -> tuple[dict[str, float], int]:
    """How many times each computation runs per execution of ``entry``, and the number of
    loops whose trip count is unknown (taken as 1)."""
    times: dict[str, float] = defaultdict(float)
    times[entry] = 1.0
    unknown = 0
    order, seen = [], set()

    def visit(name: str) -> None:  # callers before callees (the call graph is a DAG)
        if name in seen or name not in comps:
            return
        seen.add(name)
        for ins in comps[name].instructions:
            for _, target in _CALLEES.findall(ins.rest):
                for callee in re.findall(r"%?([\w.\-]+)", target):
                    visit(callee)
        order.append(name)

    visit(entry)
    for name in reversed(order):
        for ins in comps[name].instructions:
            for kind, target in _CALLEES.findall(ins.rest):
                factor = 1.0
                if ins.op == "while" and kind in ("body", "condition"):
                    trip = _trip_count(ins, comps)
                    if trip is None:
                        unknown += kind == "body"
                        trip = 1
                    factor = trip + (kind == "condition")
                for callee in re.findall(r"%?([\w.\-]+)", target):
                    if callee in comps:
                        times[callee] += times[name] * factor
    return dict(times), unknown


def _dot_flops(ins: Instruction, comp: Computation) -> float:
    out = 1
    for _, dims in arrays(ins.shape)[:1]:
        for d in dims:
            out *= d
    operands = re.findall(r"(?:([a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+)?%([\w.\-]+)", ins.rest.split("),")[0])
    if len(operands) < 2:
        return 0.0
    if ins.op == "dot":
        inline, name = operands[0]
        lhs = arrays(inline or comp.shape_of(name) or "")
        m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.rest)
        if not lhs or not m:
            return 0.0
        k = 1
        for c in (int(c) for c in m.group(1).split(",") if c):
            k *= lhs[0][1][c]
        return 2.0 * out * k
    inline, name = operands[1]  # convolution: what the kernel contracts (all but its 'o' dim)
    rhs = arrays(inline or comp.shape_of(name) or "")
    labels = re.search(r"dim_labels=[^_]+_([^-]+)->", ins.rest)
    if not rhs or not labels:
        return 0.0
    k = 1
    for label, d in zip(labels.group(1), rhs[0][1]):
        if label == "i":
            k *= d
    # Each spatial kernel dim: the taps that land on input elements. XLA:TPU writes a batched
    # matmul as a convolution whose batch dims are spatial, the input dilated as wide as the
    # window (``lhs_dilate``), so one tap of each window meets an element, the rest holes.
    window = re.search(r"window=\{([^}]*)\}", ins.rest)
    sizes = dilate = ()
    if window:
        field = lambda name: [int(v) for v in (re.search(rf"\b{name}=([0-9x]+)", window.group(1)) or
                                                 re.match("()", "")).group(1).split("x") if v]
        sizes, dilate = field("size"), field("lhs_dilate")
    for j, size in enumerate(sizes):
        k *= -(-size // (dilate[j] if j < len(dilate) else 1))
    return 2.0 * out * k


def count(text: str) -> Counts:
    """The ``Counts`` of a compiled program's HLO text."""
    comps, entry = parse(text)
    times, unknown = multipliers(comps, entry)
    coll: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    static: dict[str, int] = defaultdict(int)
    flops = 0.0
    for name, comp in comps.items():
        t = times.get(name, 0.0)
        for ins in comp.instructions:
            kind = ins.op[:-len("-start")] if ins.op.endswith("-start") else ins.op
            if kind in COLLECTIVES:
                parts = arrays(ins.shape)
                # An async start's shape is (operands, results[, scratch]): count the results.
                size = shape_bytes(ins.shape) if not ins.op.endswith("-start") or len(parts) < 2 else \
                    max(shape_bytes(f"{d}[{','.join(map(str, s))}]") for d, s in parts)
                static[kind] += 1
                coll[kind][0] += t
                coll[kind][1] += t * size
            elif ins.op in ("dot", "convolution"):
                flops += t * _dot_flops(ins, comp)
    return Counts({k: (v[0], v[1]) for k, v in coll.items()}, dict(static), flops, unknown,
                  hbm_traffic(comps, entry, times))


# Instructions that move no data of their own (views, tuples, control, the async halves whose
# start already counted the transfer).
_NO_TRAFFIC = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "conditional", "call",
               "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "iota"}
_CONTROL_CALLS = {"while", "conditional", "call", "async-start"}
_OPERANDS = re.compile(r"%([\w.\-]+)")


def _operand_names(ins: Instruction) -> list[str]:
    """The operands of an instruction (its text up to the closing parenthesis of the operand list)."""
    depth, end = 1, len(ins.rest)
    for i, ch in enumerate(ins.rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            end = i
            break
    return _OPERANDS.findall(ins.rest[:end])


def _fusion_traffic(ins: Instruction, operands: list[str], shapes: dict[str, str], fused: Computation | None) -> float:
    """Bytes a fusion moves: its operands' and result's, with sliced operands and in-place
    updates counted by what they touch (module docstring)."""
    reads = [shape_bytes(shapes.get(o, "")) for o in operands]
    write = shape_bytes(ins.shape)
    if fused is None or not fused.instructions:
        return sum(reads) + write
    local = {i.name: i for i in fused.instructions}
    index = {i.name: int(m.group(1)) for i in fused.instructions if i.op == "parameter"
             for m in [re.match(r"(\d+)\)", i.rest)] if m}
    users: dict[str, list[Instruction]] = defaultdict(list)
    for i in fused.instructions:
        for o in _operand_names(i):
            users[o].append(i)
    root = fused.instructions[-1]
    in_place = root.op == "dynamic-update-slice"
    if in_place:
        args = _operand_names(root)
        buffer, update = (args + ["", ""])[:2]
        write = shape_bytes(local[update].shape) if update in local else write
    for name, k in index.items():
        if k >= len(reads):
            continue
        use = users.get(name, [])
        if in_place and use == [root] and _operand_names(root)[:1] == [name]:
            reads[k] = 0  # the buffer updated in place is not read
        elif use and all(u.op in ("dynamic-slice", "slice") and _operand_names(u)[:1] == [name] for u in use):
            reads[k] = sum(shape_bytes(u.shape) for u in use)
    return sum(reads) + write


def hbm_traffic(comps: dict[str, Computation], entry: str, times: dict[str, float]) -> float:
    """Memory bytes read and written per execution by the top-level instructions (those of the
    entry computation and of the loops, branches and calls it runs), loops counted."""
    control, stack = set(), [entry]
    while stack:
        name = stack.pop()
        if name in control or name not in comps:
            continue
        control.add(name)
        for ins in comps[name].instructions:
            if ins.op in _CONTROL_CALLS:
                for _, target in _CALLEES.findall(ins.rest):
                    stack += re.findall(r"%?([\w.\-]+)", target)
    total = 0.0
    for name in control:
        comp, t = comps[name], times.get(name, 0.0)
        shapes = {**comp.params, **{i.name: i.shape for i in comp.instructions}}
        for ins in comp.instructions:
            if ins.op in _NO_TRAFFIC or ins.op.endswith("-done"):
                continue
            operands = _operand_names(ins)
            if ins.op == "fusion":
                called = re.search(r"calls=%?([\w.\-]+)", ins.rest)
                moved = _fusion_traffic(ins, operands, shapes, comps.get(called.group(1)) if called else None)
            elif ins.op.endswith("-start"):  # its shape holds its operands and results
                moved = shape_bytes(ins.shape)
            elif ins.op == "dynamic-slice":
                moved = 2 * shape_bytes(ins.shape)
            elif ins.op == "dynamic-update-slice" and len(operands) > 1:
                moved = 2 * shape_bytes(shapes.get(operands[1], ""))
            else:
                moved = shape_bytes(ins.shape) + sum(shape_bytes(shapes.get(o, "")) for o in operands)
            total += t * moved
    return total
