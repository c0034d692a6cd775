"""The worker side of prefect-ray for Rust: runs Rust tasks inside Ray workers.

Each Ray task calls `run_task`, which hands the task's header and its upstream values to an
executor: the user's own binary, started in executor mode and kept alive for the life of
the worker process. The executor answers with the run's status (states, logs) and value.
Data frames travel over a pair of pipes, never over stdout, so nothing a task prints can
corrupt them.
"""

import os
import struct
import subprocess
import sys

_executors = {}


class ExecutorCrashed(Exception):
    """The executor process died while running a task (so Ray may retry it)."""


class _Executor:
    def __init__(self, path):
        command_read, command_write = os.pipe()
        reply_read, reply_write = os.pipe()
        env = dict(os.environ)
        env["PREFECT_RAY_EXECUTOR"] = f"{command_read},{reply_write}"
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
        self.replies = os.fdopen(reply_read, "rb", buffering=1 << 16)

    def call(self, parts):
        header = [struct.pack("<I", len(parts))]
        for part in parts:
            header.append(struct.pack("<Q", len(part)))
        self.commands.write(b"".join(header))
        for part in parts:
            self.commands.write(part)
        (count,) = struct.unpack("<I", self._read(4))
        lengths = [struct.unpack("<Q", self._read(8))[0] for _ in range(count)]
        return [self._read(length) for length in lengths]

    def _read(self, length):
        buffer = bytearray(length)
        view = memoryview(buffer)
        filled = 0
        while filled < length:
            read = self.replies.readinto(view[filled:])
            if not read:
                raise EOFError("the executor closed its reply pipe")
            filled += read
        return bytes(buffer)

    def close(self, kill=False):
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


def _describe_exit(code):
    if code is None:
        return "it did not exit"
    if code < 0:
        try:
            import signal

            return f"it was killed by signal {signal.Signals(-code).name}"
        except (ValueError, ImportError):
            return f"it was killed by signal {-code}"
    return f"it exited with code {code}"


def executor_path(spec):
    """An absolute path, or `shipped:<name>` for a binary shipped in this package."""
    if spec.startswith("shipped:"):
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "bin", spec[len("shipped:"):])
    return spec


def run_task(executor, header, *dependencies):
    """The body of every Ray task of prefect-ray for Rust; returns (status, value)."""
    path = executor_path(executor)
    current = _executors.get(path)
    if current is None or current.process.poll() is not None:
        current = _executors[path] = _Executor(path)
    try:
        status, value, control = current.call([header, *dependencies])
    except (OSError, EOFError, struct.error) as error:
        _executors.pop(path, None)
        code = current.close(kill=True)
        raise ExecutorCrashed(
            f"the task's executor process ({os.path.basename(path)}, pid {current.process.pid}) died "
            f"while running it: {_describe_exit(code)} ({error.__class__.__name__})"
        ) from None
    except BaseException:
        # Cancelled (KeyboardInterrupt from ray.cancel) or stopped: the run must stop too.
        _executors.pop(path, None)
        current.close(kill=True)
        raise
    if control == b"exit":
        # A timed-out attempt is still running in the executor: end it with its process.
        _executors.pop(path, None)
        current.close(kill=True)
    return status, value


def named(name):
    """`run_task` under the task's name, so Ray shows and logs it by that name."""

    def task(executor, header, *dependencies):
        return run_task(executor, header, *dependencies)

    task.__name__ = name
    task.__qualname__ = name
    return task
