"""The benchmark cases on raw Ray, through its Python API: the baseline for our runner.

`python raw_ray.py <case> [args]` runs one case on a temporary 2-CPU Ray instance (bound to
127.0.0.1, the settings our runner uses) and prints one JSON object, like `bench <case>`.
Times exclude starting Ray, except in `startup`, and follow a warm-up.
"""

import json
import resource
import sys
import tempfile
import time

import ray


@ray.remote
def noop(index):
    return None


@ray.remote
def noop_chunk(indexes):
    return [None for _ in indexes]


@ray.remote
def increment(previous):
    return previous + 1


@ray.remote
def leaf(index):
    return index


@ray.remote
def add(left, right):
    return left + right


@ray.remote
def produce(megabytes):
    return b"\x07" * (megabytes << 20)


@ray.remote
def consume(data):
    return len(data)


def start(temp_dir):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1", _temp_dir=temp_dir)
    ray.get([noop.remote(i) for i in range(20)])


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    case, args = sys.argv[1], [int(a) for a in sys.argv[2:]]
    with tempfile.TemporaryDirectory(prefix="rb-", dir="/tmp") as temp_dir:
        if case == "startup":
            started = time.perf_counter()
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1", _temp_dir=temp_dir)
            ray.shutdown()
            print(json.dumps({"seconds": time.perf_counter() - started}))
            return
        start(temp_dir)
        try:
            if case in ("noop", "scale"):
                n = args[0]
                started = time.perf_counter()
                ray.get([noop.remote(i) for i in range(n)])
                seconds = time.perf_counter() - started
                result = {"tasks_per_s": n / seconds, "seconds": seconds, "driver_peak_mb": peak_rss_mb()}
            elif case == "noop_chunked":
                # What a Ray user who knows the cost of a task writes: one task per chunk of
                # the same size our runner batches (64 runs).
                n, chunk = args[0], args[1]
                started = time.perf_counter()
                chunks = [noop_chunk.remote(range(i, min(i + chunk, n))) for i in range(0, n, chunk)]
                results = [value for part in ray.get(chunks) for value in part]
                assert len(results) == n
                seconds = time.perf_counter() - started
                result = {"tasks_per_s": n / seconds, "seconds": seconds}
            elif case == "chain":
                n = args[0]
                started = time.perf_counter()
                last = increment.remote(0)
                for _ in range(1, n):
                    last = increment.remote(last)
                assert ray.get(last) == n
                result = {"seconds": time.perf_counter() - started, "tasks": n}
            elif case == "tree":
                leaves = args[0]
                started = time.perf_counter()
                level = [leaf.remote(i) for i in range(leaves)]
                while len(level) > 1:
                    level = [add.remote(level[i], level[i + 1]) for i in range(0, len(level), 2)]
                total = ray.get(level[0])
                assert total == leaves * (leaves - 1) // 2
                result = {"seconds": time.perf_counter() - started, "tasks": 2 * leaves - 1}
            elif case == "data":
                megabytes = args[0]
                started = time.perf_counter()
                value = produce.remote(megabytes)
                length = ray.get(consume.remote(value))
                assert length == megabytes << 20
                result = {"seconds": time.perf_counter() - started, "driver_peak_mb": peak_rss_mb()}
            else:
                raise SystemExit(f"unknown case {case!r}")
        finally:
            ray.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
