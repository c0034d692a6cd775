"""What the bridge decides without Ray's help: addresses, resource requests, and how a Ray
error ends a run."""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
import ray.exceptions

from prefect_ray_worker import ExecutorCrashed
from prefect_ray_worker.driver import InvalidAddress, Unreachable, classify, probe, probe_target, unmet_request
from prefect_ray_worker.protocol import FailureKind

RAY_ERRORS = {
    "crashed": ExecutorCrashed,
    "cancelled": ray.exceptions.TaskCancelledError,
    "out_of_memory": ray.exceptions.OutOfMemoryError,
}


def test_probe_targets_come_from_ray_client_and_gcs_addresses() -> None:
    assert probe_target("ray://head:10001") == ("head", 10001)
    assert probe_target("10.0.0.1:6379") == ("10.0.0.1", 6379)
    assert probe_target("[::1]:6379") == ("::1", 6379)
    assert probe_target("auto") is None
    assert probe_target("ray://auto") is None
    with pytest.raises(InvalidAddress, match="the port 'x' is not a number"):
        probe_target("head:x")


def test_probing_a_closed_port_fails_once_the_wait_is_over() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(Unreachable, match=f"nothing answers at 127.0.0.1:{port}"):
        probe(f"127.0.0.1:{port}", wait=0.5)
    assert time.monotonic() - started < 5


def test_probing_an_open_port_succeeds() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        probe(f"ray://127.0.0.1:{listener.getsockname()[1]}", wait=0)


def node(alive: bool = True, **resources: float) -> dict[str, object]:
    return {"Alive": alive, "Resources": {"node:127.0.0.1": 1.0, "object_store_memory": 1e9, **resources}}


def test_a_request_one_node_meets_is_fine_even_if_the_sum_is_needed_for_another() -> None:
    nodes = [node(CPU=2.0), node(CPU=1.0, special=1.0)]
    assert unmet_request({"num_cpus": 2}, nodes) is None
    assert unmet_request({"num_cpus": 1, "resources": {"special": 1}}, nodes) is None


def test_a_request_no_live_node_meets_says_what_each_has() -> None:
    nodes = [node(CPU=2.0), node(CPU=1.0, special=1.0), node(alive=False, CPU=64.0)]
    unmet = unmet_request({"num_cpus": 2, "resources": {"special": 1}}, nodes)
    assert unmet is not None
    assert unmet.startswith("no node of the Ray cluster can ever meet this request (CPU: 2, special: 1)")
    assert "its 2 live node(s) have {CPU: 2}, {CPU: 1, special: 1}" in unmet


def test_placements_we_cannot_judge_are_left_to_ray() -> None:
    assert unmet_request({"num_cpus": 64, "scheduling_strategy": "NODE_AFFINITY"}, [node(CPU=2.0)]) is None
    assert unmet_request({"num_cpus": 0}, []) is None


def test_a_cancelled_task_is_cancelled() -> None:
    kind, message = classify(ray.exceptions.TaskCancelledError(), **RAY_ERRORS)
    assert (kind, message) == (FailureKind.CANCELLED, "the task was cancelled in Ray")


def test_a_dead_executor_crashes_with_its_own_words() -> None:
    class Wrapped(Exception):
        cause = ExecutorCrashed("the task's executor process (app, pid 7) died while running it: it was killed by signal SIGKILL")

    kind, message = classify(Wrapped(), **RAY_ERRORS)
    assert kind is FailureKind.CRASHED
    assert message.endswith("killed by signal SIGKILL")


def test_a_task_killed_for_memory_crashes_and_says_so() -> None:
    kind, message = classify(
        ray.exceptions.OutOfMemoryError("Task was killed due to the node running low on memory."), **RAY_ERRORS
    )
    assert kind is FailureKind.CRASHED
    assert message.startswith("out of memory: Ray's memory monitor killed the task's worker")
    assert "memory=<bytes>" in message


def test_any_other_ray_error_crashes_with_its_last_line() -> None:
    error = ray.exceptions.WorkerCrashedError()
    kind, message = classify(error, **RAY_ERRORS)
    assert kind is FailureKind.CRASHED
    assert message.startswith("WorkerCrashedError: ")


def test_a_gcs_address_where_nothing_listens_is_unreachable_within_the_wait() -> None:
    from prefect_ray_worker.ray_internals import check_gcs

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(Unreachable, match=f"nothing answers at 127.0.0.1:{port}"):
        check_gcs(f"127.0.0.1:{port}", wait=0.5)
    assert time.monotonic() - started < 3


def test_versions_match_as_ray_matches_them() -> None:
    from prefect_ray_worker.driver import version_mismatch

    cluster = {"ray_version": "2.60.0", "python_version": "3.11.7"}
    assert version_mismatch(cluster, "2.60.0", "3.11.7") is None
    assert version_mismatch(cluster, "2.60.0", "3.11.9", "minor") is None
    patch = version_mismatch(cluster, "2.60.0", "3.11.9")
    assert patch is not None and patch.startswith("the cluster runs Ray 2.60.0 on Python 3.11.7, and this program's")
    ray_differs = version_mismatch(cluster, "2.59.0", "3.11.7", "minor")
    assert ray_differs is not None and "has Ray 2.59.0 on Python 3.11.7" in ray_differs
    assert version_mismatch({}, "2.60.0", "3.11.7") is None, "a cluster without metadata is not judged"


def test_a_ray_client_connection_to_other_versions_is_refused_by_ray_client_s_rule() -> None:
    from types import SimpleNamespace

    from prefect_ray_worker.driver import client_version_mismatch

    server = SimpleNamespace(ray_version="2.60.0", python_version="3.11.7")
    assert client_version_mismatch(server, "2.60.0", "3.11.9") is None, "Ray Client matches Python's minor version"
    other_python = client_version_mismatch(server, "2.60.0", "3.12.1")
    assert other_python is not None and "Ray 2.60.0 on Python 3.11.7" in other_python and "Python 3.12.1" in other_python
    other_ray = client_version_mismatch(server, "2.59.0", "3.11.7")
    assert other_ray is not None and "has Ray 2.59.0" in other_ray
    assert client_version_mismatch(SimpleNamespace(), "2.60.0", "3.11.7") is None, "a context without versions"


def _submits(count: int, function: int = 0, first_key: int = 0) -> list[Any]:
    from prefect_ray_worker.protocol import ONE_RUN, Submit

    return [Submit(first_key + n, function, bytes([ONE_RUN]) + b"\x80", [], []) for n in range(count)]


def test_a_few_submissions_stay_one_ray_task_each() -> None:
    from prefect_ray_worker.driver import join_submissions

    submits = _submits(8)
    assert list(join_submissions(submits, 1.0, 64, lambda f: True)) == submits, "8 runs on 1 CPU: no batch"
    assert list(join_submissions(_submits(1), 1.0, 64, lambda f: True)) == _submits(1)
    many = _submits(100)
    assert list(join_submissions(many, 1.0, 1, lambda f: True)) == many, "max_batch 1 turns joining off"
    assert list(join_submissions(many, 1.0, 64, lambda f: False)) == many, "a function without a batch form"


def test_piled_up_submissions_become_batches_as_the_program_encodes_them() -> None:
    from prefect_ray_worker.driver import join_submissions
    from prefect_ray_worker.protocol import Dependencies, SubmitBatch

    joined = list(join_submissions(_submits(16), 1.0, 64, lambda f: True))
    assert len(joined) == 8 and all(isinstance(batch, SubmitBatch) for batch in joined), "eight batches per CPU"
    assert [batch.keys for batch in joined] == [[n, n + 1] for n in range(0, 16, 2)]
    # The same bytes as the golden SubmitBatch call of two runs whose headers are b"\x80".
    assert joined[0].call == bytes([1, 0x92, 0xC4, 0x01, 0x80, 0xC4, 0x01, 0x80])
    assert joined[0].dependencies == [Dependencies([], []), Dependencies([], [])]
    large = list(join_submissions(_submits(2000), 2.0, 64, lambda f: True))
    assert [len(batch.keys) for batch in large[:2]] == [64, 64] and len(large) == 32, "at most max_batch runs"


def test_a_run_that_takes_another_s_value_or_another_function_ends_a_group() -> None:
    from prefect_ray_worker.driver import join_submissions
    from prefect_ray_worker.protocol import IN_FILE, Submit, SubmitBatch

    dependent = Submit(16, 0, bytes([0]) + b"\x80", [3], [])
    other_function = _submits(16, function=1, first_key=17)
    in_file = Submit(33, 1, bytes([IN_FILE]) + b"/dev/shm/x", [], [])
    commands = [*_submits(16), dependent, *other_function, in_file]
    joined = list(join_submissions(commands, 1.0, 64, lambda f: True))
    batches = [c for c in joined if isinstance(c, SubmitBatch)]
    assert [b.keys[0] for b in batches] == list(range(0, 16, 2)) + list(range(17, 33, 2))
    assert {b.function for b in batches[8:]} == {1}
    assert dependent in joined, "a run that takes a value of the group is not joined with it"
    assert joined[-1] == in_file, "a call in a shared-memory file goes as it came"


def test_whether_a_function_has_a_batch_form_is_asked_after_the_commands_before_it() -> None:
    from prefect_ray_worker.driver import join_submissions

    defined: set[int] = set()
    commands: list[Any] = ["define 0", *_submits(16)]
    for command in join_submissions(commands, 1.0, 64, lambda f: f in defined):
        if command == "define 0":
            defined.add(0)
    assert defined == {0}
    joined = join_submissions(["define 0", *_submits(16)], 1.0, 64, lambda f: f in set())
    assert len(list(joined)) == 17, "undefined: nothing joined"
