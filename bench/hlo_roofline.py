"""Where a compiled step's time goes, by a roofline over its HLO text (no device needed).

    python -m capture_jax.aot --config configs/capture.py:paper --topology v5p:2x2x1 \\
        --batch_per_chip 256 --hlo_dir /tmp/hlo
    python bench/hlo_roofline.py /tmp/hlo/train_step_v5p_2x2x1_256.hlo.txt --chip v5p

Each top-level instruction of the entry computation (a fusion, a convolution, a collective, a
copy) costs max(FLOPs / peak, bytes / HBM bandwidth): its operands are read and its result is
written once, and a fusion's FLOPs are those of the matmuls (convolutions, dots) inside it, at
the bf16 peak when both inputs are bf16 and at a sixth of it otherwise (f32 matmuls take several
bf16 passes). Instructions are grouped by the JAX operation that made them (the last part of
their `op_name`, marked `bwd` inside a transpose) and by whether the bytes or the FLOPs bound
them. A model of the chip, much cruder than XLA's: it says which operations dominate, not how
long a step takes. Prints one JSON line per group, largest first, then the largest instructions.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re

# bf16 peak FLOP/s and HBM bytes/s per chip (vendor figures).
CHIPS = {"v4": (275e12, 1.2e12), "v5e": (197e12, 0.82e12), "v5p": (459e12, 2.76e12),
         "v6e": (918e12, 1.64e12)}
BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
         "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
SHAPE = re.compile(r"\b(pred|[su](?:8|16|32|64)|bf16|f16|f32|f64)\[([0-9,]*)\]")
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][a-z0-9-]*)\((.*)$")
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
        "partition-id", "replica-id", "iota"}


def shapes(text: str) -> list[tuple[str, list[int]]]:
    return [(t, [int(d) for d in dims.split(",") if d]) for t, dims in SHAPE.findall(text)]


def nbytes(text: str) -> int:
    return sum(BYTES[t] * math.prod(dims) for t, dims in shapes(text))


def computations(hlo: str) -> dict[str, list[str]]:
    """Computation name -> its instruction lines (the entry one under 'ENTRY')."""
    out, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY )?%(\S+) .*\{$", line)
        if head:
            name = "ENTRY" if head.group(1) else head.group(2)
            out[name] = []
        elif name and line.startswith("  "):
            out[name].append(line)
    return out


def matmul_flops(lines: list[str], types: dict | None = None) -> tuple[float, bool]:
    """FLOPs of the convolutions and dots in `lines` (a computation), and whether any has f32
    inputs; `types` holds the result types of instructions defined before them."""
    types = {} if types is None else types
    flops, f32 = 0.0, False
    for line in lines:
        m = INSTRUCTION.match(line)
        if not m:
            continue
        name, out_type, op, rest = m.groups()
        types[name] = out_type
        if op not in ("convolution", "dot"):
            continue
        operands = re.findall(r"%([^\s,)]+)", rest.split(")")[0])
        lhs, rhs = (shapes(types.get(o, ""))[:1] for o in operands[:2])
        if not lhs or not rhs:
            continue
        out_elems = math.prod(shapes(out_type)[0][1])
        if op == "dot":
            dims = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", rest)
            contracted = math.prod(lhs[0][1][int(d)] for d in dims.group(1).split(",") if d)
        else:  # dim_labels=b0f_0io->b0f: contracted = input features x window.
            labels = re.search(r"dim_labels=([^_]+)_([^-]+)->", rest)
            feature = labels.group(1).index("f") if labels else len(lhs[0][1]) - 1
            window = re.search(r"window=\{size=([0-9x]+)", rest)
            contracted = lhs[0][1][feature] * (
                math.prod(int(s) for s in window.group(1).split("x")) if window else 1)
        flops += 2.0 * out_elems * contracted
        f32 = f32 or "f32" in (lhs[0][0], rhs[0][0])
    return flops, f32


def label(line: str, op: str) -> str:
    name = re.search(r'op_name="([^"]*)"', line)
    if not name:
        return op
    parts = [p for p in name.group(1).split("/") if p and not p.startswith(("jit(", "jvp("))]
    backward = any(p.startswith("transpose(") for p in parts)
    last = re.sub(r"\(.*", "", parts[-1]) if parts else op
    return f"{last}{' bwd' if backward else ''}"


def analyse(hlo: str, peak: float, bandwidth: float):
    comps = computations(hlo)
    sizes, types, rows = {}, {}, []
    for line in comps["ENTRY"]:
        m = INSTRUCTION.match(line)
        if not m:
            continue
        name, out_type, op, rest = m.groups()
        sizes[name] = nbytes(out_type)
        if op in ("convolution", "dot"):
            flops, f32 = matmul_flops([line], types)
        types[name] = out_type
        if op in FREE or op == "copy-done":  # A copy's traffic is counted at its start.
            continue
        operands = re.findall(r"%([^\s,)]+)", rest.split("), ")[0])
        traffic = sizes[name] + sum(sizes.get(o, 0) for o in operands)
        called = re.search(r"calls=%([^\s,]+)", rest)
        if op not in ("convolution", "dot"):
            flops, f32 = matmul_flops(comps.get(called.group(1), [])) if called else (0.0, False)
        compute_s = flops / (peak / 6 if f32 else peak)
        memory_s = traffic / bandwidth
        rows.append(dict(name=name, op=op, what=label(line, op) + (" f32-matmul" if f32 else ""),
                         bound="flops" if compute_s >= memory_s else "bytes",
                         seconds=max(compute_s, memory_s), flops=flops, bytes=traffic))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("hlo_file")
    parser.add_argument("--chip", choices=sorted(CHIPS), default="v5p")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    with open(args.hlo_file) as f:
        rows = analyse(f.read(), *CHIPS[args.chip])
    total = sum(r["seconds"] for r in rows)
    groups = collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0])
    for r in rows:
        g = groups[(r["what"], r["bound"])]
        g[0] += r["seconds"]
        g[1] += r["flops"]
        g[2] += r["bytes"]
        g[3] += 1
    print(json.dumps({"instructions": len(rows), "roofline_ms": round(total * 1e3, 2),
                      "flops_bound_ms": round(sum(r["seconds"] for r in rows
                                                  if r["bound"] == "flops") * 1e3, 2),
                      "tflop": round(sum(r["flops"] for r in rows) / 1e12, 3),
                      "gib": round(sum(r["bytes"] for r in rows) / 2**30, 2)}))
    for (what, bound), (s, fl, by, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[
            :args.top]:
        print(json.dumps({"what": what, "bound": bound, "ms": round(s * 1e3, 3),
                          "share": round(s / total, 3), "tflop": round(fl / 1e12, 3),
                          "gib": round(by / 2**30, 3), "instructions": n}))
    for r in sorted(rows, key=lambda r: -r["seconds"])[:args.top]:
        print(json.dumps({"instruction": r["name"], "op": r["op"], "what": r["what"],
                          "bound": r["bound"], "ms": round(r["seconds"] * 1e3, 3),
                          "gib": round(r["bytes"] / 2**30, 3)}))


if __name__ == "__main__":
    main()
