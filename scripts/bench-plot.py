"""Plots outbox-bench's figures (the JSON `outbox-bench --write FILE.md` saves beside its
tables) as one SVG: backlog drain rates per reader, with the broker-alone ceiling, and
steady-state commit-to-consumer latency per publisher and rate.

usage: bench-plot.py FIGURES.json OUT.svg
"""
import json
import sys

import matplotlib

matplotlib.use("svg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

figures = json.load(open(sys.argv[1]))
plt.rcParams["svg.fonttype"] = "none"  # text stays text
drains, steady = figures["drains"], figures["steady"]
panels = (1 if drains else 0) + (1 if steady else 0)
if panels == 0:
    sys.exit("nothing to plot")
fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5), squeeze=False)
axes = list(axes[0])

if drains:
    ax = axes.pop(0)
    readers = [("relay", "outbox-relay (to Kafka)"), ("pg_recvlogical", "pg_recvlogical (to /dev/null)"),
               ("poller", "polling relay (to Kafka)"), ("debezium", "Debezium 3.6 (no sink)")]
    readers = [r for r in readers if any(d.get(r[0]) for d in drains)]
    width = 0.8 / len(readers)
    for i, (key, label) in enumerate(readers):
        xs = [j + i * width for j in range(len(drains))]
        ax.bar(xs, [(d.get(key) or 0) / 1000 for d in drains], width, label=label)
    if figures.get("broker"):
        ax.axhline(figures["broker"] / 1000, color="grey", linestyle="--", label="broker alone (plain producer)")
    ax.set_xticks([j + width * (len(readers) - 1) / 2 for j in range(len(drains))])
    ax.set_xticklabels([d["scenario"].replace(": ", ")\n").replace("a)", "(a)").replace("b)", "(b)").replace("c)", "(c)")
                        for d in drains])
    ax.set_ylabel("thousand events per second")
    ax.set_title(f"Backlog drain, {drains[0]['events']:,} events")
    ax.legend(fontsize="small")

if steady:
    ax = axes.pop(0)
    for publisher, marker, color in (("Relay", "o", "C0"), ("Poller", "s", "C2")):
        rows = sorted((s for s in steady if s["publisher"] == publisher), key=lambda s: s["rate"])
        if not rows:
            continue
        name = "outbox-relay" if publisher == "Relay" else "polling relay"
        for quantile, style in (("p50", ":"), ("p99", "-"), ("p999", "--")):
            ax.plot([s["rate"] for s in rows], [s[quantile] for s in rows], style, marker=marker, color=color,
                    label=f"{name} {quantile.replace('p999', 'p99.9')}")
    ax.axhline(25, color="grey", linewidth=0.8, label="25 ms")
    ax.set_xlabel("events per second written (single-row transactions)")
    ax.set_ylabel("commit to consumer, ms")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_title("Steady state latency")
    ax.legend(fontsize="small")

fig.tight_layout()
fig.savefig(sys.argv[2])
