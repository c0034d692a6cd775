"""Draws bench/results/latest.png from latest.json: each case's figure for each system."""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [
    (
        "noop",
        "No-op tasks per second",
        [
            ("ours, map", "ours_tasks_per_s"),
            ("ours, submit", "ours_one_submit_per_task_tasks_per_s"),
            ("Ray", "ray_tasks_per_s"),
            ("Ray, by hand", "ray_chunked_by_hand_tasks_per_s"),
            ("prefect-ray", "prefect_ray_tasks_per_s"),
        ],
    ),
    ("noop_threads", "No-op tasks per second, thread pools", [("ours", "ours_tasks_per_s"), ("Prefect", "prefect_tasks_per_s")]),
    ("tree", "Tree reduction, 1,024 leaves: seconds", [("ours", "ours_seconds"), ("Ray", "ray_seconds")]),
    ("chain", "Chain of 500 dependent tasks: seconds", [("ours", "ours_seconds"), ("Ray", "ray_seconds")]),
    ("montecarlo", "Monte Carlo: seconds", [("ours", "ours_seconds"), ("one thread", "single_thread_seconds"), ("prefect-ray", "prefect_ray_seconds")]),
    ("data", "100 MB passed between tasks: seconds", [("ours", "ours_seconds"), ("Ray", "ray_seconds")]),
    ("startup", "Start and stop Ray: seconds", [("ours", "ours_seconds"), ("Ray", "ray_seconds")]),
]


def main():
    results = json.load(open(sys.argv[1]))
    panels = [p for p in PANELS if p[0] in results]
    figure, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.4))
    for axis, (case, title, bars) in zip(axes, panels):
        values = [(label, results[case].get(key)) for label, key in bars if results[case].get(key) is not None]
        colors = ["#2d6cdf" if label.startswith("ours") else "#e0823d" if label in ("prefect-ray", "Prefect") else "#888888" for label, _ in values]
        axis.bar([label for label, _ in values], [value for _, value in values], color=colors)
        axis.set_yscale("log" if case == "noop" else "linear")
        axis.set_title(title, fontsize=9)
        axis.tick_params(labelsize=8)
        for index, (_, value) in enumerate(values):
            axis.annotate(f"{value:,.3g}", (index, value), ha="center", va="bottom", fontsize=8)
    figure.suptitle("prefect-ray for Rust, side by side with Ray and prefect-ray (medians; 2 cores)", fontsize=10)
    figure.tight_layout()
    figure.savefig(sys.argv[2], dpi=110)


if __name__ == "__main__":
    main()
