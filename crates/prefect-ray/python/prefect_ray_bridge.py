"""The driver side of prefect-ray for Rust: submits Rust task runs to Ray.

Started by the Rust runner with its commands on stdin and its replies on stdout (see
PROTOCOL.md in the prefect-ray crate). Its Python logging (its own and Ray's) goes to the
runner as `log` replies; what bypasses logging goes to stderr, which the runner logs at
DEBUG. One bridge is one Ray driver: it starts a temporary local instance or connects to an
existing cluster, and shuts down (ending what it started) when the runner says so, when its
stdin closes because the runner died, or on SIGTERM.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import resource
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, NoReturn

from prefect_ray_worker.protocol import EXIT_NO_RAY

try:
    import msgpack
    import ray
    import ray.exceptions
except ImportError as missing:
    # Without MessagePack there is no reply to send: the exit status says it, and the
    # runner tells the user what to install.
    print(f"prefect-ray bridge: Ray is not installed for {sys.executable} ({missing})", file=sys.stderr, flush=True)
    sys.exit(EXIT_NO_RAY)

from prefect_ray_worker import (
    Blob,
    ExecutorCrashed,
    files_of,
    from_part,
    named,
    named_batch,
    remove_files,
    to_shared_file,
)
from prefect_ray_worker.codec import encode_reply, read_frame
from prefect_ray_worker.driver import (
    InvalidAddress,
    TokenRefused,
    Unreachable,
    VersionMismatch,
    classify,
    client_version_mismatch,
    join_submissions,
    probe,
    route_logs,
    unmet_request,
)
from prefect_ray_worker.protocol import (
    BYE,
    FILE_LIMIT,
    MAX_COMMAND,
    BatchDone,
    BridgeStats,
    Cancel,
    ClusterInfo,
    Define,
    Died,
    Done,
    Failed,
    FailureKind,
    Fatal,
    FatalKind,
    Get,
    Live,
    LiveLine,
    NoValue,
    Release,
    Reply,
    Stats,
    StatsReply,
    Submit,
    SubmitBatch,
    UnknownCommand,
    ValueReply,
    decode_command,
    frame,
    write_all,
)
from prefect_ray_worker.ray_internals import check_client, check_gcs, stream_live_output, when_ready


class Writer:
    """Writes reply frames from any thread (Ray calls completion callbacks on threads of
    its own), each frame whole, straight to the pipe: a thread of its own would cost a
    wake-up per frame."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = threading.Lock()
        self.closed = False

    def send(self, reply: Reply | str) -> None:
        data = frame(encode_reply(reply))
        with self.lock:
            if self.closed:
                return
            try:
                write_all(self.fd, data)
            except OSError:
                self.closed = True

    def close(self) -> None:
        with self.lock:
            self.closed = True


#: How long to wait for a cluster that does not answer yet (one that is starting).
CLUSTER_WAIT = 3.0


LOG = logging.getLogger("prefect_ray.bridge")


def token_refused(error: BaseException) -> bool:
    """Whether the cluster refused this driver's token: Ray's AuthenticationError, or a gRPC
    call answered UNAUTHENTICATED, anywhere in the error's chain."""
    try:
        import grpc

        unauthenticated: Any = grpc.StatusCode.UNAUTHENTICATED
        rpc_error: Any = grpc.RpcError
    except ImportError:
        unauthenticated, rpc_error = None, ()
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ray.exceptions.AuthenticationError):
            return True
        if rpc_error and isinstance(seen, rpc_error) and getattr(seen, "code", lambda: None)() == unauthenticated:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def connect(address: str, kwargs: dict[str, Any]) -> Any:
    """ray.init for an existing cluster. Ray Client's server sometimes fails to start a
    session for a new client; asking again gets one.

    Through Ray Client, this bridge compares versions itself (unless the user set
    RAY_IGNORE_VERSION_MISMATCH): Ray Client's own check raises a bare RuntimeError, which
    would reach the program as an untyped failure."""
    through_client = address.startswith("ray://")
    own_check = through_client and "RAY_IGNORE_VERSION_MISMATCH" not in os.environ
    if own_check:
        os.environ["RAY_IGNORE_VERSION_MISMATCH"] = "1"
    attempts = 3 if through_client else 1
    for attempt in range(1, attempts + 1):
        try:
            context = ray.init(address=address, **kwargs)
            mismatch = client_version_mismatch(context, ray.__version__, platform.python_version()) if own_check else None
            if mismatch:
                ray.shutdown()
                raise VersionMismatch(mismatch)
            return context
        except ConnectionError as error:
            if token_refused(error) or attempt == attempts:
                raise
            LOG.warning("Ray Client connection failed (%s); trying again (%d/%d)", error, attempt, attempts - 1)
            try:
                ray.shutdown()
            except Exception:
                pass
    raise AssertionError("unreachable")


class Bridge:
    def __init__(self, writer: Writer, config: dict[str, Any]) -> None:
        self.writer = writer
        self.config = config
        # key -> (report ref, value ref, whether the run is one of a batch, whose report
        # ref holds the reports of the whole batch)
        self.refs: dict[int, tuple[Any, Any, bool]] = {}
        self.functions: dict[int, Any] = {}
        self.batch_functions: dict[int, Any] = {}
        self.ray_tasks = 0
        self.infeasible: dict[int, str] = {}
        self.nodes: list[dict[str, Any]] = []
        self.cpus = 1.0
        self.nodes_at = 0.0
        self.started_local = False

    def send_live(self, lines: list[LiveLine]) -> None:
        """Forwards marked lines of worker logs to the program."""
        self.writer.send(Live(lines))

    # -- start and stop -------------------------------------------------------------------

    def start(self) -> None:
        config = self.config
        kwargs = dict(config.get("init_kwargs") or {})
        kwargs.setdefault("namespace", "prefect")
        address = config.get("address")
        # Ray streams workers' logs to this driver: the lines tasks write, marked with their
        # run, reach the program while the tasks run (`stream_live_output`).
        kwargs.setdefault("log_to_driver", True)
        live = bool(kwargs["log_to_driver"])
        through_client = bool(address and address.startswith("ray://"))
        if live and through_client:
            stream_live_output(self.send_live, through_client=True)
        if address:
            if address.startswith("ray://"):
                probe(address, wait=CLUSTER_WAIT)
                if address != "ray://auto":
                    check_client(address, wait=CLUSTER_WAIT)
            elif address == "auto":
                probe(address, wait=CLUSTER_WAIT)
            else:
                check_gcs(address, wait=CLUSTER_WAIT)
            runtime_env = dict(kwargs.pop("runtime_env", None) or {})
            modules = list(runtime_env.get("py_modules") or [])
            modules.append(config["worker_package"])
            runtime_env["py_modules"] = modules
            api_url = os.environ.get("PREFECT_API_URL")
            if api_url:
                # So that tasks taking concurrency slots reach the program's Prefect server.
                env_vars = dict(runtime_env.get("env_vars") or {})
                env_vars.setdefault("PREFECT_API_URL", api_url)
                runtime_env["env_vars"] = env_vars
            kwargs["runtime_env"] = runtime_env
            context = connect(address, kwargs)
        else:
            kwargs.setdefault("_node_ip_address", "127.0.0.1")
            kwargs.setdefault("include_dashboard", False)
            kwargs.setdefault("_temp_dir", config["temp_dir"])
            context = ray.init(**kwargs)
            self.started_local = True
        if live and not through_client:
            stream_live_output(self.send_live, through_client=False)
        self.refresh_nodes(force=True)
        alive = [node for node in self.nodes if node.get("Alive")]
        self.cpus = float(sum(node.get("Resources", {}).get("CPU", 0) for node in alive))
        self.writer.send(
            ClusterInfo(
                nodes=len(alive),
                cpus=self.cpus,
                dashboard_url=getattr(context, "dashboard_url", None) or "",
                ray_version=ray.__version__,
                started_local=self.started_local,
            )
        )

    def stop(self) -> None:
        if ray.is_initialized():
            ray.shutdown()

    # -- cluster resources ----------------------------------------------------------------

    def refresh_nodes(self, force: bool = False) -> None:
        if force or time.monotonic() - self.nodes_at > 5.0:
            self.nodes = ray.nodes()
            self.nodes_at = time.monotonic()

    def unmet_request(self, options: dict[str, Any]) -> str | None:
        """Why no live node can ever run a task with these options, or None. Asks Ray
        again before saying no, in case a node just joined."""
        for attempt in range(2):
            self.refresh_nodes(force=attempt > 0)
            unmet = unmet_request(options, self.nodes)
            if unmet is None:
                return None
        return unmet

    # -- commands -------------------------------------------------------------------------

    def define(self, command: Define) -> None:
        try:
            self.define_remote(command)
        except Exception as error:
            LOG.exception("could not define the remote function of task %s", command.task_name)
            self.infeasible[command.function] = f"the Ray bridge could not define the task's remote function: {error!r}"

    def define_remote(self, command: Define) -> None:
        options = json.loads(command.options_json)
        options["num_returns"] = 2
        # The trampoline raises only when its executor died (ExecutorCrashed): a system
        # failure, which Ray retries within max_retries. (A list of exception classes would be
        # pickled into every task.)
        options.setdefault("retry_exceptions", True)
        unmet = self.unmet_request(options)
        if unmet:
            self.infeasible[command.function] = unmet
            return
        # The options go into the remote function itself, once: `.options()` would check
        # them again on every call. The function's name is the task's.
        try:
            task = named(command.task_name, self.config["executor"])
            batch = named_batch(command.task_name, self.config["executor"])
            self.functions[command.function] = ray.remote(**options)(task)
            self.batch_functions[command.function] = ray.remote(**options)(batch)
        except Exception as error:
            self.infeasible[command.function] = f"Ray refused the task's options {command.options_json}: {error}"

    def submit(self, command: Submit) -> None:
        key = command.key
        function = self.functions.get(command.function)
        if function is None:
            reason = self.infeasible.get(command.function, "unknown function")
            self.writer.send(Failed(key, FailureKind.FAILED, reason))
            return
        try:
            dependencies = self.dependencies(command.value_keys, command.report_keys)
            # A large call comes in a shared-memory file: Ray copies it into its object store
            # from the mapping, and the bridge never decodes it.
            status_ref, value_ref = function.remote(from_part(command.call), *dependencies)
        except Exception as error:
            self.writer.send(Failed(key, FailureKind.CRASHED, f"Ray did not accept the task: {error}"))
            return
        self.refs[key] = (status_ref, value_ref, False)
        self.ray_tasks += 1
        when_ready(status_ref, functools.partial(self.on_status, key))

    def dependencies(self, value_keys: list[int], report_keys: list[int]) -> list[Any]:
        """The refs a run depends on: the values it takes, then the runs it waits for (their
        reports; for a run of a batch, its value, whose first byte tells the same)."""
        waited = [self.refs[k][1] if self.refs[k][2] else self.refs[k][0] for k in report_keys]
        return [self.refs[k][1] for k in value_keys] + waited

    def submit_batch(self, command: SubmitBatch) -> None:
        keys = command.keys
        function = self.batch_functions.get(command.function)
        if function is None:
            reason = self.infeasible.get(command.function, "unknown function")
            for key in keys:
                self.writer.send(Failed(key, FailureKind.FAILED, reason))
            return
        try:
            dependencies = [ref for run in command.dependencies for ref in self.dependencies(run.value_keys, run.report_keys)]
            refs = function.options(num_returns=1 + len(keys)).remote(from_part(command.call), *dependencies)
        except Exception as error:
            for key in keys:
                self.writer.send(Failed(key, FailureKind.CRASHED, f"Ray did not accept the task: {error}"))
            return
        reports = refs[0]
        self.ray_tasks += 1
        for key, value_ref in zip(keys, refs[1:]):
            self.refs[key] = (reports, value_ref, True)
        when_ready(reports, functools.partial(self.on_batch_status, keys))

    def failure(self, error: BaseException) -> tuple[FailureKind, str]:
        return classify(
            error,
            crashed=ExecutorCrashed,
            cancelled=ray.exceptions.TaskCancelledError,
            out_of_memory=ray.exceptions.OutOfMemoryError,
        )

    def on_batch_status(self, keys: list[int], result: Any) -> None:
        if isinstance(result, BaseException):
            kind, message = self.failure(result)
            for key in keys:
                self.writer.send(Failed(key, kind, message))
        else:
            self.writer.send(BatchDone(keys, as_bytes(result)))

    def on_status(self, key: int, result: Any) -> None:
        if isinstance(result, BaseException):
            kind, message = self.failure(result)
            self.writer.send(Failed(key, kind, message))
        else:
            self.writer.send(Done(key, as_bytes(result)))

    def get(self, command: Get) -> None:
        refs = self.refs.get(command.key)
        if refs is None:
            self.writer.send(NoValue(command.request, "the value was already released"))
            return
        when_ready(refs[1], functools.partial(self.on_value, command.request))

    def on_value(self, request: int, result: Any) -> None:
        if isinstance(result, BaseException):
            self.writer.send(NoValue(request, self.failure(result)[1]))
        else:
            self.writer.send(ValueReply(request, value_part(result)))

    def release(self, command: Release) -> None:
        for key in command.keys:
            self.refs.pop(key, None)

    def cancel(self, command: Cancel) -> None:
        refs = self.refs.get(command.key)
        if refs is not None:
            try:
                # A running trampoline waits in a read that KeyboardInterrupt cannot break,
                # so only force (ending the worker and its executor) stops a running task.
                ray.cancel(refs[0], force=True)
            except Exception as error:
                LOG.warning("could not cancel: %s", error)

    def stats(self, command: Stats) -> None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        stats = BridgeStats(
            peak_rss_bytes=peak,
            objects=len(self.refs),
            bridge_pid=os.getpid(),
            namespace=ray.get_runtime_context().namespace,
            ray_tasks=self.ray_tasks,
        )
        self.writer.send(StatsReply(command.request, stats))

    def joined(self, commands: list[Any]) -> Iterator[Any]:
        """`commands`, with submissions that piled up joined into batches."""
        max_batch = int(self.config.get("max_batch") or 1)
        return join_submissions(commands, self.cpus, max_batch, lambda function: function in self.batch_functions)

    def handle(self, command: Any) -> None:
        handlers: dict[type, Callable[[Any], None]] = {
            Define: self.define,
            Submit: self.submit,
            SubmitBatch: self.submit_batch,
            Get: self.get,
            Release: self.release,
            Cancel: self.cancel,
            Stats: self.stats,
        }
        handlers[type(command)](command)


def value_part(blob: Any) -> bytes:
    """A value for the program: small ones as they are, large ones through a shared-memory
    file written straight from Ray's object store (the bridge never copies or decodes it),
    or through the pipe when no file can be written."""
    data = blob.view if isinstance(blob, Blob) else blob
    if memoryview(data).nbytes > FILE_LIMIT:
        try:
            return to_shared_file(data)
        except OSError as error:
            LOG.warning("could not hand a value over in shared memory (%s); sending it through the pipe", error)
    return as_bytes(blob)


def as_bytes(blob: Any) -> bytes:
    """A blob from a task: bytes, or for a large one a bytearray or a Blob."""
    return blob if isinstance(blob, bytes) else bytes(blob)


def fatal_for(error: BaseException) -> Fatal:
    """The reply of a bridge whose `ray.init` failed with `error`."""
    details = traceback.format_exc()
    if isinstance(error, InvalidAddress):
        return Fatal(FatalKind.INVALID_ADDRESS, str(error), details)
    if isinstance(error, Unreachable):
        return Fatal(FatalKind.UNREACHABLE, str(error), details)
    if isinstance(error, VersionMismatch):
        return Fatal(FatalKind.VERSION_MISMATCH, str(error), details)
    if isinstance(error, TokenRefused) or token_refused(error):
        return Fatal(FatalKind.TOKEN_REFUSED, "the cluster refused this driver's authentication token", details)
    return Fatal(FatalKind.INIT_FAILED, f"{type(error).__name__}: {one_line(error)}", details)


def one_line(error: BaseException) -> str:
    """The first line of an error's message that says something."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else "no details"


#: The most bytes of commands read at once: a pipe holds 64 KiB, more when the program
#: writes while the bridge reads.
READ_SIZE = 1 << 18


def run_commands(bridge: Bridge, commands: BinaryIO) -> None:
    """Runs commands until `shutdown` or the end of input. A command that fails is logged
    and the next one runs; an error of the stream itself ends the bridge. The commands that
    arrived together are handled together, which lets submissions that piled up go to Ray
    in batches (`join_submissions`)."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_COMMAND)
    while True:
        data = commands.read(READ_SIZE)
        if not data:
            return
        unpacker.feed(data)
        arrived: list[Any] = []
        ended = False
        for message in unpacker:
            try:
                command = decode_command(message)
            except UnknownCommand as error:
                LOG.warning("%s", error)
                continue
            if command is None:
                ended = True
                break
            arrived.append(command)
        for command in bridge.joined(arrived):
            try:
                bridge.handle(command)
            except Exception:
                LOG.exception("command %s failed", type(command).__name__)
        if ended:
            return


def serve(commands: BinaryIO, writer: Writer, config: dict[str, Any]) -> int:
    """Connects, then runs commands until `shutdown` or the end of input."""
    bridge = Bridge(writer, config)
    try:
        try:
            bridge.start()
        except Exception as error:
            writer.send(fatal_for(error))
            return 1
        try:
            run_commands(bridge, commands)
        except Exception as error:
            # What ends the bridge goes to the program as its cause, not as a line of stderr.
            writer.send(Died(f"{type(error).__name__}: {one_line(error)}", traceback.format_exc()))
            return 1
    finally:
        try:
            bridge.stop()
        except Exception:
            LOG.exception("ray.shutdown failed")
    return 0


def log_thread_error(hook: threading.ExceptHookArgs) -> None:
    """An error in a thread of Ray's (a completion callback) is logged, not printed."""
    name = hook.thread.name if hook.thread else "?"
    if hook.exc_value is not None:
        LOG.error("error in thread %s", name, exc_info=hook.exc_value)


def main() -> int:
    # Unbuffered, so reading returns what has arrived: the commands after the first (the
    # configuration, a length-prefixed frame) are a plain stream of MessagePack values.
    commands = os.fdopen(0, "rb", buffering=0)
    replies = os.dup(1)
    os.dup2(2, 1)
    writer = Writer(replies)
    route_logs(writer.send)
    # The runner ships the program to clusters on purpose: Ray's notes on packaging it (and
    # its warning that the file is large) say nothing the user can act on.
    logging.getLogger("ray._private.runtime_env.packaging").setLevel(logging.ERROR)
    threading.excepthook = log_thread_error

    def on_signal(signum: int, frame: Any) -> NoReturn:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    # The bridge has a process group of its own, so a terminal's Ctrl-C never reaches it;
    # SIGINT must not be ignored here, or Ray's workers inherit that and ray.cancel breaks.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    config = read_frame(commands)
    if config is None:
        return 0
    try:
        return serve(commands, writer, config)
    finally:
        writer.send(BYE)
        writer.close()
        # Everything the runner set up for this bridge goes with it, also when the runner
        # died without a word (its stdin closed), and so do values it never took.
        shutil.rmtree(config.get("own_dir") or config.get("temp_dir") or "", ignore_errors=True)
        remove_files(files_of(os.getpid()))


if __name__ == "__main__":
    sys.exit(main())
