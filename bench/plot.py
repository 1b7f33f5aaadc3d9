"""The admitted rate over time of every shared subject, against the limit.

matplotlib is optional: without it the bench says so and writes no picture.
"""

from __future__ import annotations

import importlib
from typing import Any


def rate_over_time(results: dict[str, Any], path: str) -> str | None:
    """Write the PNG; return why not when it cannot."""
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        return "matplotlib not installed, no plot"
    # A file-only backend: the bench runs on machines without a display.
    matplotlib.use("Agg")
    pyplot = importlib.import_module("matplotlib.pyplot")

    plan = results["plan"]
    processes = max(plan["accuracy_processes"])
    rates = plan["accuracy_rates_per_s"]
    bin_s = plan["bin_s"]
    whole_bins = int(plan["accuracy_s"] / bin_s)

    figure, axes = pyplot.subplots(
        len(rates), 1, figsize=(12, 4.2 * len(rates)), squeeze=False
    )
    drawn = False
    for axis, rate_per_s in zip(axes[:, 0], rates, strict=True):
        for key, entry in results["accuracy"].items():
            run = next(
                (
                    r
                    for r in entry.get("runs", [])
                    if r["rate_per_s"] == rate_per_s and r["processes"] == processes
                ),
                None,
            )
            if run is None:
                continue
            counts = run["bins"][:whole_bins]
            times_s = [(index + 0.5) * bin_s for index in range(len(counts))]
            per_s = [count / bin_s for count in counts]
            # shmrate on top and heavier, so the peers cannot hide it.
            ours = key.startswith("shmrate")
            axis.plot(
                times_s,
                per_s,
                "-" if ours else "--",
                marker=".",
                label=key,
                linewidth=2.4 if ours else 1.1,
                zorder=5 if ours else 2,
            )
            drawn = True
        axis.axhline(rate_per_s, color="black", linewidth=2, label="configured rate")
        # The first bin of a full bucket (or window) holds its whole burst,
        # ten or more times the rate; clipping keeps the steady state legible.
        axis.set_ylim(0, 2.5 * rate_per_s)
        axis.set_xlim(0, whole_bins * bin_s)
        axis.set_title(
            f"{rate_per_s:,}/s shared by {processes} processes "
            f"({bin_s * 1000:.0f} ms bins; the first bin's burst is clipped)"
        )
        axis.set_xlabel("seconds since start")
        axis.set_ylabel("admitted per second")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if not drawn:
        pyplot.close(figure)
        return "no accuracy run to plot"
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return None
