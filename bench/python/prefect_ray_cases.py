"""The benchmark cases on prefect-ray (Python) and on Prefect's ThreadPoolTaskRunner, with a
local Prefect server (PREFECT_API_URL): what our runner is compared with.

`python prefect_ray_cases.py <case> [args]` prints one JSON object, like `bench <case>`.
Times exclude starting Ray, and follow a warm-up.
"""

import json
import shutil
import sys
import tempfile
import time

import numpy as np
from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_ray import RayTaskRunner


# Ray's session files go here, not to /tmp/ray, and are removed when the case ends.
RAY_TEMP_DIR = tempfile.mkdtemp(prefix="prb-", dir="/tmp")


def ray_runner():
    return RayTaskRunner(
        init_kwargs={
            "num_cpus": 2,
            "include_dashboard": False,
            "log_to_driver": False,
            "_node_ip_address": "127.0.0.1",
            "_temp_dir": RAY_TEMP_DIR,
        }
    )


@task
def noop(index):
    return None


@task
def sample(seed, samples):
    """The same Monte Carlo work as the Rust task, with numpy in chunks."""
    generator = np.random.default_rng(seed)
    hits = 0
    left = samples
    while left:
        chunk = min(left, 1_000_000)
        x, y = generator.random(chunk), generator.random(chunk)
        hits += int(np.count_nonzero(x * x + y * y <= 1.0))
        left -= chunk
    return hits


def timed_noops(n):
    warm = noop.map(range(4))
    [f.result() for f in warm]
    started = time.perf_counter()
    futures = noop.map(range(n))
    [f.result() for f in futures]
    return time.perf_counter() - started


@flow(task_runner=ray_runner())
def noop_on_ray(n):
    return timed_noops(n)


@flow(task_runner=ThreadPoolTaskRunner())
def noop_on_threads(n):
    return timed_noops(n)


@flow(task_runner=ray_runner())
def montecarlo(tasks, samples):
    warm = noop.map(range(4))
    [f.result() for f in warm]
    started = time.perf_counter()
    futures = sample.map(range(tasks), samples=samples)
    hits = sum(f.result() for f in futures)
    return time.perf_counter() - started, 4.0 * hits / (tasks * samples)


def main():
    case, args = sys.argv[1], [int(a) for a in sys.argv[2:] if a.isdigit()]
    if case == "noop":
        n = args[0]
        seconds = noop_on_threads(n) if len(sys.argv) > 3 and sys.argv[3] == "threads" else noop_on_ray(n)
        result = {"tasks_per_s": n / seconds, "seconds": seconds}
    elif case == "montecarlo":
        seconds, pi = montecarlo(args[0], args[1])
        result = {"seconds": seconds, "pi": pi}
    else:
        raise SystemExit(f"unknown case {case!r}")
    print(json.dumps(result))


if __name__ == "__main__":
    try:
        main()
    finally:
        shutil.rmtree(RAY_TEMP_DIR, ignore_errors=True)
