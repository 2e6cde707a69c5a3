"""Summarise the mechanism measurements of a comparison's runs (the numbers the README quotes).

    python3 bench/alignment_summary.py COMPARE_OUTPUT_DIR

A comparison with several conditions (the demo's benign and poisoned data) keeps each
condition's runs in a folder of its own (benign/, poison-10pct/); each is summarised apart.
For every SAP run, at each measurement step after the first (at step 1 the probe is still 0),
the shift of cos(∇L_task, ĝ) that the probe makes over V = 0, and the shift a random-sign probe
of the same size makes (the control); for every run, the held-out pairs' margin and T = 1 loss
at each validation. Standard library only.
"""

import json
import statistics
import sys
from pathlib import Path


def events(run):
    with open(run / "metrics.jsonl") as f:
        for line in f:
            yield json.loads(line)


def describe(values):
    if not values:
        return "none"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    higher = sum(v > 0 for v in values)
    return f"{statistics.mean(values):+.4f} (sd {sd:.4f}; higher on {higher} of {len(values)})"


def main(out):
    conditions = sorted({p.parent.parent for p in out.glob("*/*/metrics.jsonl")})
    for condition in conditions:
        print(f"== {condition.name}")
        summarise(condition)
    if not conditions:
        summarise(out)


def summarise(out):
    probe, random, zero = [], [], {"sft": [], "sap": []}
    validation = {}
    for run in sorted(p for p in out.iterdir() if (p / "metrics.jsonl").exists()):
        method = run.name.split("-")[0]
        for e in events(run):
            a = e.get("alignment")
            if e.get("event") == "step" and a:
                if method in zero:
                    zero[method].append(a["at_zero"])
                if method == "sap" and e["step"] > 1 and a.get("at_probe") is not None:
                    probe.append(a["at_probe"] - a["at_zero"])
                    random.append(a["at_random"] - a["at_zero"])
            if e.get("event") == "safety_check" and e.get("pair_loss") is not None:
                validation.setdefault(method, []).append((e["step"], e["pair_margin"], e["pair_loss"]))
    print(f"probe − V=0 cosine shift (SAP, steps after the first): {describe(probe)}")
    print(f"random − V=0 cosine shift (the control):              {describe(random)}")
    for method, values in zero.items():
        if values:
            print(f"cos at V = 0, {method}: range [{min(values):+.4f}, {max(values):+.4f}], mean {statistics.mean(values):+.4f}")
    for method, rows in sorted(validation.items()):
        steps = sorted({s for s, _, _ in rows})
        for step in steps:
            at = [(m, l) for s, m, l in rows if s == step]
            margins = [m for m, _ in at]
            losses = [l for _, l in at]
            print(
                f"{method} step {step}: held-out margin {statistics.mean(margins):.2f} "
                f"[{min(margins):.2f}, {max(margins):.2f}], T=1 loss {statistics.mean(losses):.4f} over {len(at)} runs"
            )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
