"""Where XLA's TPU cost model puts a compiled step's time, by the JAX operation that made it.

    python -m capture_jax.aot --config configs/capture.py:paper --topology v5p:2x2x1 \\
        --batch_per_chip 256 --hlo_dir /tmp/hlo
    python bench/hlo_cycles.py /tmp/hlo/train_step_v5p_2x2x1_256.hlo.txt [--top 30]

The TPU compiler writes its cost model's estimate for each top-level instruction of a compiled
program into the instruction's backend config (`estimated_cycles`); their sum is what
`cost_analysis()["optimal_seconds"]` reports, up to the clock. This sums them by the JAX
operation in each instruction's `op_name` (its last part, `bwd` inside a transpose, and the
part before it, e.g. the einsum's spec), so the shares say which operations the estimate is made
of. Estimates of the cost model, not measurements. Prints JSON lines, largest share first.
"""

from __future__ import annotations

import argparse
import collections
import json
import re


def operation(line: str) -> str:
    """`last op[ bwd] | context` from an instruction's op_name."""
    name = re.search(r'op_name="([^"]*)"', line)
    parts = [p for p in (name.group(1) if name else "").split("/") if p and not p.startswith("jit(")]
    if not parts:
        return "(no op_name)"
    backward = any(p.startswith("transpose(") for p in parts)
    context = parts[-2] if len(parts) > 1 else ""
    while re.match(r"(jvp|transpose|vmap)\(", context):
        context = re.sub(r"^(jvp|transpose|vmap)\(|\)$", "", context)
    return f"{re.sub(r'[(.].*', '', parts[-1])}{' bwd' if backward else ''} | {context[:50]}"


def cycles_by_operation(hlo: str) -> tuple[collections.Counter, collections.Counter]:
    entry = hlo[hlo.index("\nENTRY"):]
    cycles, counts = collections.Counter(), collections.Counter()
    for line in entry.splitlines()[1:]:
        found = re.search(r'"estimated_cycles":"([0-9]+)"', line)
        if found:
            key = operation(line)
            cycles[key] += int(found.group(1))
            counts[key] += 1
    return cycles, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("hlo_file", help="A compiled step's HLO text (aot --hlo_dir).")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    with open(args.hlo_file) as f:
        cycles, counts = cycles_by_operation(f.read())
    total = sum(cycles.values())
    print(json.dumps({"estimated_cycles": total, "instructions": sum(counts.values())}))
    for key, c in cycles.most_common(args.top):
        print(json.dumps({"operation": key, "share": round(c / total, 4), "cycles": c,
                          "instructions": counts[key]}, ensure_ascii=False))


if __name__ == "__main__":
    main()
