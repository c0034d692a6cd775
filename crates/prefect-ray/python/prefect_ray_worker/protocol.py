"""The wire protocol between the program, the bridge, the worker trampolines and the
executors, as the Python side speaks it.

`src/protocol/PROTOCOL.md` in the prefect-ray crate tells the whole story; `src/protocol/mod.rs`
is the Rust side. Every constant and message is defined once here and once there, and the
golden fixtures in `src/protocol/fixtures/` are checked by both languages' tests.

This module needs nothing but the standard library, so the bridge can import it before it
knows whether Ray is there; `codec.py` encodes and decodes with MessagePack.

The rule for every message between the program and the bridge: a unit message is its name
as a string (``"shutdown"``); any other is a map of one entry, its name to the array of its
fields in the order declared here. Records inside messages are arrays of fields too.
"""

from __future__ import annotations

import enum
import os
import struct
from typing import Any, BinaryIO, NamedTuple, Union

# -- constants ------------------------------------------------------------------------------

#: The variable that puts the program in executor mode: "<command fd>,<reply fd>".
EXECUTOR_ENV = "PREFECT_RAY_EXECUTOR"
#: The executor's path for a binary shipped inside the worker package: "shipped:<name>".
SHIPPED_PREFIX = "shipped:"
#: The first byte of a call of one run / of several runs (a batch of a map's runs).
ONE_RUN = 0
MANY_RUNS = 1
#: The first byte of a report or value blob of a run that completed / did not complete.
COMPLETED = 0
NOT_COMPLETED = 1
#: The first byte of a blob kept in a shared-memory file; the rest is the file's path.
IN_FILE = 2
#: Values larger than this go between two processes of one machine through a shared-memory
#: file rather than a pipe (the part is then IN_FILE and the file's path).
FILE_LIMIT = 1 << 20
#: The control word an executor ends a reply with when it must be restarted.
RESTART = b"exit"
#: The largest command the bridge reads (MessagePack's limit for one buffer).
MAX_COMMAND = 2**31 - 1
#: The unit command that ends the bridge.
SHUTDOWN = "shutdown"
#: The unit reply a bridge sends last.
BYE = "bye"
#: The bridge's exit status when its Python lacks Ray (or MessagePack): it cannot even
#: encode a reply then.
EXIT_NO_RAY = 3


# -- program to bridge ----------------------------------------------------------------------


class Define(NamedTuple):
    """Defines a remote function for a task with these Ray options."""

    function: int
    task_name: str
    options_json: str


class Submit(NamedTuple):
    """Submits one run."""

    key: int
    function: int
    call: bytes
    value_keys: list[int]
    report_keys: list[int]


class Dependencies(NamedTuple):
    """A run's dependencies, in a batch."""

    value_keys: list[int]
    report_keys: list[int]


class SubmitBatch(NamedTuple):
    """Submits several runs of one task as one Ray task."""

    keys: list[int]
    function: int
    call: bytes
    dependencies: list[Dependencies]


class Get(NamedTuple):
    """Asks for a run's value blob."""

    request: int
    key: int


class Release(NamedTuple):
    """Lets go of runs' objects."""

    keys: list[int]


class Cancel(NamedTuple):
    """Cancels a run."""

    key: int


class Stats(NamedTuple):
    """Asks for the bridge's own figures."""

    request: int


Command = Union[Define, Submit, SubmitBatch, Get, Release, Cancel, Stats]

COMMANDS: dict[str, type[Command]] = {
    "define": Define,
    "submit": Submit,
    "submit_batch": SubmitBatch,
    "get": Get,
    "release": Release,
    "cancel": Cancel,
    "stats": Stats,
}


class UnknownCommand(Exception):
    """A command this bridge does not know: the program and the bridge disagree."""


def decode_command(message: Any) -> Command | None:
    """A command as it came off the stream; ``None`` for ``shutdown``."""
    if message == SHUTDOWN:
        return None
    if not isinstance(message, dict) or len(message) != 1:
        raise UnknownCommand(f"not a command: {message!r}")
    ((name, fields),) = message.items()
    kind = COMMANDS.get(name)
    if kind is None:
        raise UnknownCommand(f"unknown command {name!r}")
    if kind is SubmitBatch:
        keys, function, call, dependencies = fields
        return SubmitBatch(keys, function, call, [Dependencies(*d) for d in dependencies])
    return kind(*fields)


# -- bridge to program ----------------------------------------------------------------------


class ClusterInfo(NamedTuple):
    """What the bridge found when it connected."""

    nodes: int
    cpus: float
    dashboard_url: str
    ray_version: str
    started_local: bool


class FatalKind(str, enum.Enum):
    """Why a bridge could not connect."""

    INVALID_ADDRESS = "invalid_address"
    UNREACHABLE = "unreachable"
    TOKEN_REFUSED = "token_refused"
    VERSION_MISMATCH = "version_mismatch"
    INIT_FAILED = "init_failed"


class Fatal(NamedTuple):
    """The first and last reply of a bridge that could not connect."""

    kind: FatalKind
    message: str
    details: str


class Died(NamedTuple):
    """The bridge cannot go on (an error in its command loop): the cause, its last reply
    before ``bye``."""

    message: str
    details: str


class LogLevel(str, enum.Enum):
    """The level of a log record from the bridge."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class LogRecord(NamedTuple):
    """A log record of the bridge's Python (its own, Ray's), for the program's log."""

    level: LogLevel
    target: str
    message: str


class Done(NamedTuple):
    """A run's Ray task ended: its report."""

    key: int
    report: bytes


class BatchDone(NamedTuple):
    """A batch's Ray task ended: its runs' reports (an array of byte strings, encoded)."""

    keys: list[int]
    reports: bytes


class FailureKind(str, enum.Enum):
    """How a run ended that Ray could not run to its end."""

    FAILED = "failed"
    CRASHED = "crashed"
    CANCELLED = "cancelled"


class Failed(NamedTuple):
    """Ray could not run a run to its end."""

    key: int
    kind: FailureKind
    message: str


class ValueReply(NamedTuple):
    """The answer to a Get."""

    request: int
    blob: bytes


class NoValue(NamedTuple):
    """A Get that found no value."""

    request: int
    message: str


class BridgeStats(NamedTuple):
    """Figures the bridge reports about itself."""

    peak_rss_bytes: int
    objects: int
    bridge_pid: int
    namespace: str
    ray_tasks: int


class StatsReply(NamedTuple):
    """The answer to a Stats."""

    request: int
    stats: BridgeStats


class LiveLine(NamedTuple):
    """A marked line from a worker's log: a line a run wrote while it ran (``seq`` is its
    index among the run's lines), or the mark that it started (``seq`` is None)."""

    run: str
    pid: int
    seq: int | None
    micros: int
    stream: str
    text: str


class Live(NamedTuple):
    """Marked lines, as Ray's log streaming brought them."""

    lines: list[LiveLine]


LIVE_MARK = "[prefect-run "


def parse_live(line: str) -> LiveLine | None:
    """The marked line in ``line`` (which may carry Ray's own prefix), if there is one:
    ``[prefect-run <run> <pid> <seq> <micros> <stream>] <text>`` or
    ``[prefect-run <run> <pid> started <micros>]`` or
    ``[prefect-run <run> <pid> progress <micros>] <fraction>``."""
    start = line.find(LIVE_MARK)
    if start < 0:
        return None
    end = line.find("]", start)
    if end < 0:
        return None
    fields = line[start + len(LIVE_MARK) : end].split(" ")
    try:
        if len(fields) == 4 and fields[2] == "started":
            return LiveLine(fields[0], int(fields[1]), None, int(fields[3]), "", "")
        if len(fields) == 4 and fields[2] == "progress":
            fraction = line[end + 1 :].strip()
            float(fraction)
            return LiveLine(fields[0], int(fields[1]), None, int(fields[3]), "p", fraction)
        if len(fields) == 5:
            text = line[end + 2 :] if line[end + 1 : end + 2] == " " else line[end + 1 :]
            return LiveLine(fields[0], int(fields[1]), int(fields[2]), int(fields[3]), fields[4], text.rstrip("\n"))
    except ValueError:
        return None
    return None


Reply = Union[ClusterInfo, Fatal, Died, LogRecord, Done, BatchDone, Failed, ValueReply, NoValue, StatsReply, Live]

REPLY_NAMES: dict[type, str] = {
    ClusterInfo: "ready",
    Fatal: "fatal",
    Died: "died",
    LogRecord: "log",
    Done: "done",
    BatchDone: "batch_done",
    Failed: "failed",
    ValueReply: "value",
    NoValue: "value_error",
    StatsReply: "stats",
    Live: "live",
}


# -- frames ---------------------------------------------------------------------------------


def frame(body: bytes) -> bytes:
    """A length-prefixed frame: a little-endian u32 length, then the body."""
    return struct.pack("<I", len(body)) + body


def read_exactly(stream: BinaryIO, length: int) -> bytes | None:
    """Exactly `length` bytes, or ``None`` if the stream ends first."""
    data = b""
    while len(data) < length:
        chunk = stream.read(length - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def parts_header(sizes: list[int]) -> bytes:
    """The head of a parts frame: a u32 count, then a u64 length per part (little-endian)."""
    return struct.pack(f"<I{len(sizes)}Q", len(sizes), *sizes)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Writes all of `data` to a descriptor."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]
