"""The worker side of prefect-ray for Rust: runs Rust tasks inside Ray workers.

Each Ray task calls `run_task`, which hands the task's call and its upstream values to an
executor: the user's own binary, started in executor mode and kept alive for the life of
the worker process. The executor answers with the run's report (states, logs) and value.
Frames travel over a pair of pipes, never over stdout, so nothing a task prints can corrupt
them (see PROTOCOL.md in the prefect-ray crate).
"""

from __future__ import annotations

import fcntl
import glob
import io
import mmap
import os
import pickle
import signal
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from typing import Any, Union

from .protocol import EXECUTOR_ENV, IN_FILE, RESTART, SHIPPED_PREFIX, parts_header, write_all

F_SETPIPE_SZ = 1031
# Values larger than this come back as the bytearray they were read into: Ray stores a
# bytearray out of band, without first copying it into Python bytes.
LARGE = 1 << 16

_SHARED = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class Blob:
    """A large value, kept in shared memory. Ray stores its bytes out of band (one copy into
    the object store) and gives the task that needs it a view of the store's memory (no
    copy), which goes to that task's executor through a shared-memory file again."""

    __slots__ = ("view",)

    def __init__(self, view: memoryview) -> None:
        self.view = view

    def __reduce_ex__(self, protocol: Any) -> tuple[type[Blob], tuple[pickle.PickleBuffer]]:
        return (Blob, (pickle.PickleBuffer(self.view),))

    def __bytes__(self) -> bytes:
        return bytes(self.view)


Part = Union[bytes, bytearray, memoryview]


def from_part(part: Part) -> Part | Blob:
    """A part from another process of this machine (an executor, the program): the bytes,
    or a Blob mapped from the shared-memory file it names, which goes at once."""
    if part[:1] != bytes([IN_FILE]):
        return part
    path = bytes(part[1:]).decode()
    with open(path, "rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ)
    os.unlink(path)
    return Blob(memoryview(mapped))


def _to_executor(dependency: Any, written: list[str]) -> Part:
    """A dependency for the executor: small ones as they are, Blobs through a file (whose
    path goes to `written`)."""
    if not isinstance(dependency, Blob):
        return dependency  # type: ignore[no-any-return]
    return to_shared_file(dependency.view, written)


def to_shared_file(data: Part, written: list[str] | None = None) -> bytes:
    """Writes `data` to a new shared-memory file of this process (named after its pid, so
    whoever sees it die can remove what it left); returns the part that names the file,
    which the reader maps and unlinks."""
    descriptor, path = tempfile.mkstemp(prefix=f"prefect-ray-{os.getpid()}-", dir=_SHARED)
    if written is not None:
        written.append(path)
    try:
        write_all(descriptor, data)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(descriptor)
    return bytes([IN_FILE]) + path.encode()


def remove_files(paths: Iterable[str]) -> None:
    """Removes shared-memory files that nobody will open now (those already opened are
    unlinked already)."""
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def files_of(pid: int) -> list[str]:
    """The shared-memory files a process wrote: each writer names its files
    ``prefect-ray-<pid>-...``."""
    return glob.glob(os.path.join(_SHARED, f"prefect-ray-{pid}-*"))


def worker_log() -> str:
    """Where this worker's output goes (Ray's log file of the worker, which a dead executor's
    last words went to), as a clause for a message; empty if it is not a file."""
    try:
        path = os.readlink("/proc/self/fd/1")
    except OSError:
        return ""
    return f"; its output is in Ray's log {path}" if path.startswith("/") else ""


class ExecutorCrashed(Exception):
    """The executor process died while running a task (so Ray may retry it)."""


class _Executor:
    def __init__(self, path: str) -> None:
        command_read, command_write = os.pipe()
        reply_read, reply_write = os.pipe()
        for pipe in (command_write, reply_write):
            try:
                fcntl.fcntl(pipe, F_SETPIPE_SZ, 1 << 20)
            except OSError:
                pass
        env = dict(os.environ)
        env[EXECUTOR_ENV] = f"{command_read},{reply_write}"
        self.path = path
        self.process = subprocess.Popen(
            [path],
            env=env,
            stdin=subprocess.DEVNULL,
            pass_fds=(command_read, reply_write),
            close_fds=True,
        )
        os.close(command_read)
        os.close(reply_write)
        self.commands = os.fdopen(command_write, "wb", buffering=0)
        self.commands_fd = command_write
        self.replies = io.BufferedReader(io.FileIO(reply_read, "rb"), buffer_size=1 << 16)

    def call(self, parts: list[Part]) -> list[Part]:
        """Sends a parts frame; returns the reply's parts."""
        sizes = [memoryview(part).nbytes for part in parts]
        header = parts_header(sizes)
        if sum(sizes) < LARGE:
            write_all(self.commands_fd, b"".join([header, *parts]))
        else:
            write_all(self.commands_fd, header)
            for part in parts:
                write_all(self.commands_fd, part)
        (count,) = struct.unpack("<I", self._read(4))
        lengths = struct.unpack(f"<{count}Q", self._read(8 * count))
        return [self._read(length) for length in lengths]

    def _read(self, length: int) -> bytes | bytearray:
        if length <= LARGE:
            data = self.replies.read(length)
            if len(data) < length:
                raise EOFError("the executor closed its reply pipe")
            return data
        buffer = bytearray(length)
        view = memoryview(buffer)
        filled = 0
        while filled < length:
            read = self.replies.readinto(view[filled:])
            if not read:
                raise EOFError("the executor closed its reply pipe")
            filled += read
        return buffer

    def close(self, kill: bool = False) -> int | None:
        for stream in (self.commands, self.replies):
            try:
                stream.close()
            except OSError:
                pass
        if kill:
            self.process.kill()
        try:
            return self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


_executors: dict[str, _Executor] = {}


def describe_exit(code: int | None) -> str:
    """How a process ended, as a user reads it."""
    if code is None:
        return "it did not exit"
    if code < 0:
        try:
            return f"it was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"it was killed by signal {-code}"
    return f"it exited with code {code}"


def executor_path(spec: str) -> str:
    """An absolute path, or `shipped:<name>` for a binary shipped in this package."""
    if spec.startswith(SHIPPED_PREFIX):
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "bin", spec[len(SHIPPED_PREFIX) :])
    return spec


def _call(executor: str, parts: list[Any]) -> list[Part]:
    """Hands a call to this worker's executor (started on first use); returns its reply."""
    current = _executors.get(executor)
    if current is None:
        path = executor_path(executor)
        try:
            current = _Executor(path)
        except FileNotFoundError:
            raise ExecutorCrashed(
                f"the program that runs the task is not on this node at {path}: let the runner ship it to the "
                "cluster (the default, without .ship_executor(false)), or install it at that path on every node"
            ) from None
        _executors[executor] = current
    written: list[str] = []
    try:
        *reply, control = current.call([_to_executor(part, written) for part in parts])
    except (OSError, EOFError, struct.error) as error:
        _executors.pop(executor, None)
        code = current.close(kill=True)
        # What the dead executor was writing will never be read.
        remove_files(files_of(current.process.pid))
        raise ExecutorCrashed(
            f"the task's executor process ({os.path.basename(current.path)}, pid {current.process.pid}) died "
            f"while running it: {describe_exit(code)} ({error.__class__.__name__}){worker_log()}"
        ) from None
    except BaseException:
        # Cancelled (KeyboardInterrupt from ray.cancel) or stopped: the run must stop too.
        _executors.pop(executor, None)
        current.close(kill=True)
        remove_files(files_of(current.process.pid))
        raise
    finally:
        # The inputs the executor did not open (it unlinks those it opens).
        remove_files(written)
    if control == RESTART:
        # A timed-out attempt is still running in the executor: end it with its process.
        _executors.pop(executor, None)
        current.close(kill=True)
    return reply


def run_task(executor: str, call: Part | Blob, *dependencies: Any) -> tuple[Part, Part | Blob]:
    """The body of a Ray task of one run; returns (report, value)."""
    report, value = _call(executor, [call, *dependencies])
    return report, from_part(value)


def run_batch(executor: str, call: Part | Blob, *dependencies: Any) -> tuple[Part | Blob, ...]:
    """The body of a Ray task of several runs; returns (reports, value, value, ...)."""
    reports, *values = _call(executor, [call, *dependencies])
    return (reports, *map(from_part, values))


def _named(body: Callable[..., Any], name: str, executor: str) -> Callable[..., Any]:
    def task(call: Part | Blob, *dependencies: Any) -> Any:
        return body(executor, call, *dependencies)

    task.__name__ = name
    task.__qualname__ = name
    return task


def named(name: str, executor: str) -> Callable[..., Any]:
    """`run_task` for one task: named after it, so Ray shows and logs it by that name, and
    bound to the executor that runs it, so calls carry only the run's call and inputs."""
    return _named(run_task, name, executor)


def named_batch(name: str, executor: str) -> Callable[..., Any]:
    """`run_batch` for one task, named and bound the same way."""
    return _named(run_batch, name, executor)
