"""The soak's curves as a PNG: ``plot_soak.py SAMPLES.csv OUT.png``.

Reads bench/bench_chain.py's samples.csv and draws, against time: the shim's RSS (zoomed,
with the +5 % goal; Rspamd's on the right), its open descriptors and tasks, the clients'
p50/p99 latency per interval (with the machine's load average, when the samples have
it), and the accepted rate with the 4xx/lost transactions of each interval. Needs matplotlib (the
``bench`` extra); it is imported here only, so the bench runs without it.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path


def read(path: Path) -> dict[str, list[float]]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {key: [float(r[key] or 0) for r in rows] for key in (rows[0] if rows else {})}


def plot_samples(samples: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    data = read(samples)
    if not data:
        raise SystemExit(f"{samples}: no samples")
    minutes = [t / 60 for t in data["t"]]
    fig, axes = plt.subplots(4, 1, figsize=(11, 12), sharex=True)
    rss, fds, lat, rate = axes
    shim_mib = [v / 1024 for v in data["shim_rss_kb"]]
    rss.plot(minutes, shim_mib, label="shim RSS")
    rss.set_ylabel("shim MiB")
    # zoomed on the shim (its growth is the question); a +5 % line for the goal
    seen = [v for v in shim_mib if v] or [1.0]
    rss.set_ylim(min(seen) * 0.9, max(max(seen), seen[0] * 1.05) * 1.05)
    rss.axhline(seen[0] * 1.05, color="tab:blue", linestyle=":", label="shim start + 5 %")
    other = rss.twinx()
    rspamd_mib = [v / 1024 for v in data["rspamd_rss_kb"]]
    other.plot(minutes, rspamd_mib, color="tab:orange", alpha=0.6, label="Rspamd RSS (right)")
    other.set_ylabel("Rspamd MiB")
    other.set_ylim(0, max(rspamd_mib + [1.0]) * 1.15)
    _legend(rss, other)
    rss.set_title(_title(data))
    fds.plot(minutes, data["shim_fds"], label="shim open fds")
    fds.plot(minutes, data["shim_tasks"], label="shim tasks (threads)")
    fds.plot(minutes, data["queue"], label="Exim queue", alpha=0.6)
    fds.set_ylim(bottom=0)
    fds.legend(loc="upper left")
    lat.plot(minutes, data["p50_ms"], label="p50 per connection")
    lat.plot(minutes, data["p99_ms"], label="p99 per connection")
    lat.set_ylabel("ms")
    lat.set_ylim(bottom=0)
    if any(data.get("load1", ())):
        # the machine's load: other work on the same cores shows in the latency
        load = lat.twinx()
        load.plot(minutes, data["load1"], color="tab:gray", alpha=0.5,
                  label="load average, 1 min (right)")
        load.set_ylabel("load")
        load.set_ylim(bottom=0)
        _legend(lat, load)
    else:
        lat.legend(loc="upper left")
    rate.plot(minutes, data["rate"], label="accepted / s")
    rate.bar(minutes, data["degraded"], width=(minutes[1] - minutes[0]) * 0.8
             if len(minutes) > 1 else 0.1, color="tab:red", label="4xx / lost in interval")
    rate.set_xlabel("minutes")
    rate.set_ylim(bottom=0)
    rate.legend(loc="upper left")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def _legend(left, right) -> None:
    """One legend for an axis and its twin."""
    lines = left.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    left.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left")


def _title(data: dict[str, list[float]]) -> str:
    rss = [v for v in data["shim_rss_kb"] if v]
    growth = (rss[-1] - rss[0]) / rss[0] * 100 if rss else 0.0
    return (f"exim-policy chain: {data['t'][-1] / 60:.0f} min, shim RSS "
            f"{rss[0] / 1024:.1f} -> {rss[-1] / 1024:.1f} MiB ({growth:+.1f} %)" if rss
            else "exim-policy chain")


if __name__ == "__main__":
    plot_samples(Path(sys.argv[1]), Path(sys.argv[2]))
