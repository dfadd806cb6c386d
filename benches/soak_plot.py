"""Draws benches/soak.sh's samples: RSS, descriptors, threads and disk use over time, a line at
each restart. Usage: soak_plot.py SOAK.CSV OUT.PNG"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

rows = list(csv.DictReader(open(sys.argv[1])))
t = [int(r["seconds"]) / 60 for r in rows]
panels = [
    ("rss_kib", "RSS (MiB)", 1 / 1024),
    ("fds", "file descriptors", 1),
    ("threads", "threads", 1),
    ("disk_bytes", "data directory (MiB)", 1 / 2**20),
]
fig, axes = plt.subplots(len(panels), 1, figsize=(9, 9), sharex=True)
restarts = [t[i] for i in range(1, len(rows)) if rows[i]["restarts"] != rows[i - 1]["restarts"]]
for ax, (col, label, scale) in zip(axes, panels):
    ax.plot(t, [float(r[col]) * scale for r in rows])
    for x in restarts:
        ax.axvline(x, color="grey", linewidth=0.5, linestyle=":")
    ax.set_ylabel(label)
    ax.set_ylim(bottom=0)
axes[-1].set_xlabel("minutes (dotted: a restart, kill -9 and SIGTERM in turn)")
fig.suptitle("Sluice soak: benches/soak.sh")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=80)
