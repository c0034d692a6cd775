"""What the bridge decides without Ray's help: whether an address answers, whether a
resource request can ever be met, and how a Ray error ends a run. Kept apart from the
bridge's process loop so each can be tested alone (python/tests).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import msgpack

from .protocol import MANY_RUNS, ONE_RUN, Dependencies, FailureKind, LogLevel, LogRecord, Submit, SubmitBatch


class Unreachable(Exception):
    """Nothing answers at the cluster's address."""


class InvalidAddress(Exception):
    """The address is not a host and a port."""


class TokenRefused(Exception):
    """The cluster refused this driver's authentication token."""


class VersionMismatch(Exception):
    """The cluster runs another Ray or Python than this driver."""


def version_mismatch(cluster: Mapping[str, Any], ray_version: str, python_version: str, match_level: str = "patch") -> str | None:
    """Why a driver with these versions cannot use a cluster whose metadata (as Ray keeps it
    in the GCS: ``ray_version``, ``python_version``) is `cluster`, or ``None`` if it can. The
    rule is Ray's own: the same Ray, and the same Python up to `match_level` ("minor" or
    "patch", Ray's RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL)."""
    theirs_ray, theirs_python = str(cluster.get("ray_version", "")), str(cluster.get("python_version", ""))
    if not theirs_ray or not theirs_python:
        return None
    depth = 2 if match_level == "minor" else 3
    if theirs_ray == ray_version and theirs_python.split(".")[:depth] == python_version.split(".")[:depth]:
        return None
    return (
        f"the cluster runs Ray {theirs_ray} on Python {theirs_python}, and this program's Python has Ray "
        f"{ray_version} on Python {python_version}; run the program with the cluster's versions "
        "(PREFECT_RAY_PYTHON can name a Python that has them)"
    )


def client_version_mismatch(context: Any, ray_version: str, python_version: str) -> str | None:
    """Why a driver with these versions cannot use the cluster that Ray Client connected it
    to (`context`, what ``ray.init("ray://...")`` returns, which names the server's
    versions), or ``None`` if it can. Ray Client's rule: the same Ray and the same Python
    minor version."""
    cluster = {
        "ray_version": getattr(context, "ray_version", "") or "",
        "python_version": getattr(context, "python_version", "") or "",
    }
    return version_mismatch(cluster, ray_version, python_version, "minor")


def probe_target(address: str) -> tuple[str, int] | None:
    """The host and port to probe for `address` (``ray://host:port`` or ``host:port``), or
    ``None`` for addresses Ray resolves itself (``auto``, ``local``, a bare name).

    Raises `InvalidAddress` when the port is not a number."""
    target = address[len("ray://") :] if address.startswith("ray://") else address
    if target in ("auto", "local") or ":" not in target:
        return None
    host, _, port = target.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise InvalidAddress(f"{target} is not a host:port address: the port {port!r} is not a number") from None


def probe(address: str, wait: float = 15.0) -> None:
    """Fails fast when nothing listens at the address: Ray itself would wait for minutes.
    Tries again for up to `wait` seconds, for a cluster that is still starting."""
    target = probe_target(address)
    if target is None:
        return
    host, port = target
    deadline = time.monotonic() + wait
    while True:
        try:
            socket.create_connection((host, port), timeout=5).close()
            return
        except OSError as error:
            if time.monotonic() > deadline:
                raise Unreachable(
                    f"nothing answers at {host}:{port} ({error}); check that the cluster is running and the address is right"
                ) from None
            time.sleep(0.25)


def demand(options: Mapping[str, Any]) -> dict[str, float]:
    """What one run with these Ray options asks of a node: CPUs, GPUs, memory and custom
    resources, the ones it asks none of left out."""
    wanted = {"CPU": float(options.get("num_cpus", 1) or 0), "GPU": float(options.get("num_gpus", 0) or 0)}
    if options.get("memory"):
        wanted["memory"] = float(options["memory"])
    for name, amount in (options.get("resources") or {}).items():
        wanted[name] = float(amount)
    return {name: amount for name, amount in wanted.items() if amount > 0}


def unmet_request(options: Mapping[str, Any], nodes: Iterable[Mapping[str, Any]]) -> str | None:
    """Why no live node (as `ray.nodes()` describes them) can ever run a task with these
    options, or ``None`` when one can or the placement is not ours to judge."""
    wanted = demand(options)
    if not wanted or options.get("scheduling_strategy") not in (None, "DEFAULT", "SPREAD"):
        return None
    alive = [node for node in nodes if node.get("Alive")]
    if any(all(node.get("Resources", {}).get(name, 0) >= amount for name, amount in wanted.items()) for node in alive):
        return None
    described = ", ".join(
        "{"
        + ", ".join(
            f"{k}: {v:g}"
            for k, v in sorted(node.get("Resources", {}).items())
            if not k.startswith("node:") and k != "object_store_memory"
        )
        + "}"
        for node in alive
    )
    asked = ", ".join(f"{k}: {v:g}" for k, v in wanted.items())
    return (
        f"no node of the Ray cluster can ever meet this request ({asked}); its {len(alive)} live node(s) have {described}. "
        f"Lower the request, or add a node that has it"
    )


def classify(
    error: BaseException,
    crashed: type[BaseException],
    cancelled: type[BaseException],
    out_of_memory: type[BaseException],
) -> tuple[FailureKind, str]:
    """How a run ends for a Ray error, and a one-line message. The trampoline reports task
    failures in the report it returns, so an error here means Ray could not run the task to
    its end: it crashed, unless it was cancelled. `crashed` is the trampoline's
    ExecutorCrashed, `cancelled` Ray's TaskCancelledError, `out_of_memory` Ray's
    OutOfMemoryError."""
    cause = getattr(error, "cause", None)
    if isinstance(error, cancelled) or isinstance(cause, cancelled):
        return FailureKind.CANCELLED, "the task was cancelled in Ray"
    if isinstance(cause, crashed):
        return FailureKind.CRASHED, str(cause)
    if isinstance(error, out_of_memory):
        return FailureKind.CRASHED, (
            "out of memory: Ray's memory monitor killed the task's worker, on every attempt, because its node ran low "
            "on memory; give the task less to hold, or ask for the memory it needs with memory=<bytes> so Ray "
            "places it where there is room (RAY_task_oom_retries sets how often it is tried again)"
        )
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return FailureKind.CRASHED, f"{type(error).__name__}: {lines[-1] if lines else 'no details'}"


def log_level(levelno: int) -> LogLevel:
    """The protocol's level for a Python logging level."""
    if levelno >= logging.ERROR:
        return LogLevel.ERROR
    if levelno >= logging.WARNING:
        return LogLevel.WARNING
    if levelno >= logging.INFO:
        return LogLevel.INFO
    return LogLevel.DEBUG


class ReplyLogHandler(logging.Handler):
    """Sends log records to the program as `log` replies, so they reach its log at their
    own level instead of as lines of stderr whose level nobody knows.

    The message is the record's own text (and traceback): Ray sets a formatter with a time
    and a level on every handler of its logger, which the program's log adds itself."""

    def __init__(self, send: Callable[[LogRecord], None]) -> None:
        super().__init__()
        self.send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            self.send(LogRecord(log_level(record.levelno), record.name, message))
        except Exception:
            self.handleError(record)


def route_logs(send: Callable[[LogRecord], None], loggers: Iterable[str] = ("", "ray")) -> ReplyLogHandler:
    """Replaces the console handlers of these loggers (the root and Ray's) with one that
    sends their records to the program."""
    handler = ReplyLogHandler(send)
    for name in loggers:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            if isinstance(old, logging.StreamHandler) and not isinstance(old, logging.FileHandler):
                logger.removeHandler(old)
        logger.addHandler(handler)
    return handler


def join_submissions(commands: list[Any], cpus: float, max_batch: int, batchable: Callable[[int], bool]) -> Iterator[Any]:
    """The commands that arrived together, with the submissions that piled up joined into
    batches: the bridge's answer to a flow that submits runs faster than Ray takes tasks.

    A run of consecutive `Submit`s of one function (inline calls, none taking or waiting for
    another of the run) becomes `SubmitBatch`es the way the program batches a map: only when
    there are many more runs than CPUs, leaving at least eight batches per CPU, at most
    `max_batch` runs each. A lone submission, or a few, stay as they are, and nothing waits
    for more to arrive. Each run stays a task run of its own.

    Lazy: `batchable(function)` (whether the function has a batch form) is asked when its
    first submission is reached, after the commands before it (its `Define`) have been handled."""
    index = 0
    while index < len(commands):
        first = commands[index]
        if not (_inline_submit(first) and batchable(first.function)):
            yield first
            index += 1
            continue
        group = [first]
        keys = {first.key}
        index += 1
        while index < len(commands):
            following = commands[index]
            if not _inline_submit(following) or following.function != first.function:
                break
            if keys.intersection(following.value_keys) or keys.intersection(following.report_keys):
                break
            group.append(following)
            keys.add(following.key)
            index += 1
        yield from _batches(group, cpus, max_batch)


def _inline_submit(command: Any) -> bool:
    return isinstance(command, Submit) and command.call[:1] == bytes([ONE_RUN])


def _batches(group: list[Submit], cpus: float, max_batch: int) -> Iterator[Submit | SubmitBatch]:
    size = min(max_batch, int(len(group) // (8 * max(cpus, 1.0))))
    if size <= 1:
        yield from group
        return
    for start in range(0, len(group), size):
        chunk = group[start : start + size]
        if len(chunk) == 1:
            yield chunk[0]
            continue
        headers = [bytes(submit.call[1:]) for submit in chunk]
        yield SubmitBatch(
            keys=[submit.key for submit in chunk],
            function=chunk[0].function,
            call=bytes([MANY_RUNS]) + msgpack.packb(headers, use_bin_type=True),
            dependencies=[Dependencies(submit.value_keys, submit.report_keys) for submit in chunk],
        )
