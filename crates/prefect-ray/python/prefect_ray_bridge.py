"""The driver side of prefect-ray for Rust: submits Rust task runs to Ray.

Started by the Rust runner with its commands on stdin and its replies on stdout (both
length-prefixed MessagePack frames); everything else that Ray or Python prints goes to
stderr, which the runner forwards to its log. One bridge is one Ray driver: it starts a
temporary local instance or connects to an existing cluster, and shuts down (ending what it
started) when the runner says so, when its stdin closes because the runner died, or on
SIGTERM.
"""

import functools
import json
import os
import shutil
import signal
import socket
import struct
import sys
import threading
import time
import traceback

import msgpack

class Writer:
    """Writes reply frames from any thread (Ray calls completion callbacks on threads of
    its own), each frame whole, straight to the pipe: a thread of its own would cost a
    wake-up per frame."""

    def __init__(self, fd):
        self.fd = fd
        self.lock = threading.Lock()
        self.closed = False

    def send(self, message):
        frame = msgpack.packb(message, use_bin_type=True)
        data = memoryview(struct.pack("<I", len(frame)) + frame)
        with self.lock:
            if self.closed:
                return
            try:
                while data:
                    data = data[os.write(self.fd, data):]
            except OSError:
                self.closed = True

    def close(self):
        with self.lock:
            self.closed = True


def read_exactly(stream, length):
    data = b""
    while len(data) < length:
        chunk = stream.read(length - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def read_frame(stream):
    header = read_exactly(stream, 4)
    if header is None:
        return None
    (length,) = struct.unpack("<I", header)
    body = read_exactly(stream, length)
    if body is None:
        return None
    return msgpack.unpackb(body, raw=False)


def log(message):
    print(f"prefect-ray bridge: {message}", file=sys.stderr, flush=True)


class Bridge:
    def __init__(self, writer, config):
        self.writer = writer
        self.config = config
        # key -> (report ref, value ref, whether the run is one of a batch, whose report
        # ref holds the reports of the whole batch)
        self.refs = {}
        self.functions = {}
        self.batch_functions = {}
        self.ray_tasks = 0
        self.infeasible = {}
        self.nodes = []
        self.nodes_at = 0.0
        self.started_local = False

    # -- start and stop -------------------------------------------------------------------

    def start(self):
        import ray

        self.ray = ray
        config = self.config
        kwargs = dict(config.get("init_kwargs") or {})
        kwargs.setdefault("namespace", "prefect")
        address = config.get("address")
        kwargs.setdefault("log_to_driver", False)
        if address:
            probe(address)
            runtime_env = dict(kwargs.pop("runtime_env", None) or {})
            modules = list(runtime_env.get("py_modules") or [])
            modules.append(config["worker_package"])
            runtime_env["py_modules"] = modules
            kwargs["runtime_env"] = runtime_env
            context = connect(ray, address, kwargs)
        else:
            kwargs.setdefault("_node_ip_address", "127.0.0.1")
            kwargs.setdefault("include_dashboard", False)
            kwargs.setdefault("_temp_dir", config["temp_dir"])
            context = ray.init(**kwargs)
            self.started_local = True
        self.refresh_nodes(force=True)
        dashboard = getattr(context, "dashboard_url", None)
        self.writer.send(
            {
                "ready": {
                    "nodes": sum(1 for node in self.nodes if node.get("Alive")),
                    "cpus": sum(node.get("Resources", {}).get("CPU", 0) for node in self.nodes if node.get("Alive")),
                    "dashboard_url": dashboard or "",
                    "ray_version": ray.__version__,
                    "started_local": self.started_local,
                },
            }
        )

    def stop(self):
        ray = getattr(self, "ray", None)
        if ray is not None and ray.is_initialized():
            ray.shutdown()

    # -- cluster resources ----------------------------------------------------------------

    def refresh_nodes(self, force=False):
        if force or time.monotonic() - self.nodes_at > 5.0:
            self.nodes = self.ray.nodes()
            self.nodes_at = time.monotonic()

    def unmet_request(self, options):
        """Why no live node can ever run a task with these options, or None."""
        demand = {"CPU": float(options.get("num_cpus", 1) or 0), "GPU": float(options.get("num_gpus", 0) or 0)}
        if options.get("memory"):
            demand["memory"] = float(options["memory"])
        for name, amount in (options.get("resources") or {}).items():
            demand[name] = float(amount)
        demand = {name: amount for name, amount in demand.items() if amount > 0}
        if not demand or options.get("scheduling_strategy") not in (None, "DEFAULT", "SPREAD"):
            return None
        for attempt in range(2):
            self.refresh_nodes(force=attempt > 0)
            alive = [node for node in self.nodes if node.get("Alive")]
            if any(all(node.get("Resources", {}).get(name, 0) >= amount for name, amount in demand.items()) for node in alive):
                return None
        largest = ", ".join(
            "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(node.get("Resources", {}).items()) if not k.startswith("node:") and k != "object_store_memory") + "}"
            for node in alive
        )
        asked = ", ".join(f"{k}: {v:g}" for k, v in demand.items())
        return (
            f"no node of the Ray cluster can ever meet this request ({asked}); its {len(alive)} live node(s) have {largest}. "
            f"Lower the request, or add a node that has it"
        )

    # -- commands -------------------------------------------------------------------------

    def define(self, function_id, task_name, options_json):
        try:
            self.define_remote(function_id, task_name, options_json)
        except Exception as error:
            log(f"could not define the remote function of task {task_name}:\n{traceback.format_exc()}")
            self.infeasible[function_id] = f"the Ray bridge could not define the task's remote function: {error!r}"

    def define_remote(self, function_id, task_name, options_json):
        options = json.loads(options_json)
        import prefect_ray_worker

        options["num_returns"] = 2
        # The trampoline raises only when its executor died (ExecutorCrashed): a system
        # failure, which Ray retries within max_retries. (A list of exception classes would be
        # pickled into every task.)
        options.setdefault("retry_exceptions", True)
        unmet = self.unmet_request(options)
        if unmet:
            self.infeasible[function_id] = unmet
            return
        # The options go into the remote function itself, once: `.options()` would check
        # them again on every call. The function's name is the task's.
        try:
            task = prefect_ray_worker.named(task_name, self.config["executor"])
            batch = prefect_ray_worker.named_batch(task_name, self.config["executor"])
            self.functions[function_id] = self.ray.remote(**options)(task)
            self.batch_functions[function_id] = self.ray.remote(**options)(batch)
        except Exception as error:
            self.infeasible[function_id] = f"Ray refused the task's options {options_json}: {error}"

    def submit(self, key, function_id, header, data_keys, status_keys):
        function = self.functions.get(function_id)
        if function is None:
            reason = self.infeasible.get(function_id, "unknown function")
            self.writer.send({"failed": [key, "failed", reason]})
            return
        try:
            dependencies = self.dependencies(data_keys, status_keys)
            status_ref, value_ref = function.remote(header, *dependencies)
        except Exception as error:
            self.writer.send({"failed": [key, "crashed", f"Ray did not accept the task: {error}"]})
            return
        self.refs[key] = (status_ref, value_ref, False)
        self.ray_tasks += 1
        status_ref._on_completed(functools.partial(self.on_status, key))

    def dependencies(self, data_keys, status_keys):
        """The refs a run depends on: the values it takes, then the runs it waits for (their
        reports; for a run of a batch, its value, whose first byte tells the same)."""
        waited = [self.refs[k][1] if self.refs[k][2] else self.refs[k][0] for k in status_keys]
        return [self.refs[k][1] for k in data_keys] + waited

    def submit_batch(self, keys, function_id, headers, dependencies_per_run):
        function = self.batch_functions.get(function_id)
        if function is None:
            reason = self.infeasible.get(function_id, "unknown function")
            for key in keys:
                self.writer.send({"failed": [key, "failed", reason]})
            return
        try:
            dependencies = [ref for data, status in dependencies_per_run for ref in self.dependencies(data, status)]
            refs = function.options(num_returns=1 + len(keys)).remote(headers, *dependencies)
        except Exception as error:
            for key in keys:
                self.writer.send({"failed": [key, "crashed", f"Ray did not accept the task: {error}"]})
            return
        reports = refs[0]
        self.ray_tasks += 1
        for key, value_ref in zip(keys, refs[1:]):
            self.refs[key] = (reports, value_ref, True)
        reports._on_completed(functools.partial(self.on_batch_status, keys))

    def on_batch_status(self, keys, result):
        if isinstance(result, BaseException):
            kind, message = classify(result)
            for key in keys:
                self.writer.send({"failed": [key, kind, message]})
        else:
            self.writer.send({"batch_done": [keys, as_bytes(result)]})

    def on_status(self, key, result):
        if isinstance(result, BaseException):
            kind, message = classify(result)
            self.writer.send({"failed": [key, kind, message]})
        else:
            self.writer.send({"done": [key, as_bytes(result)]})

    def get(self, request, key):
        refs = self.refs.get(key)
        if refs is None:
            self.writer.send({"value_error": [request, "the value was already released"]})
            return
        refs[1]._on_completed(functools.partial(self.on_value, request))

    def on_value(self, request, result):
        if isinstance(result, BaseException):
            self.writer.send({"value_error": [request, classify(result)[1]]})
        else:
            self.writer.send({"value": [request, as_bytes(result)]})

    def release(self, keys):
        for key in keys:
            self.refs.pop(key, None)

    def cancel(self, key):
        refs = self.refs.get(key)
        if refs is not None:
            try:
                # A running trampoline waits in a read that KeyboardInterrupt cannot break,
                # so only force (ending the worker and its executor) stops a running task.
                self.ray.cancel(refs[0], force=True)
            except Exception as error:
                log(f"could not cancel: {error}")

    def stats(self, request):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        namespace = self.ray.get_runtime_context().namespace
        stats = {
            "peak_rss_bytes": peak,
            "objects": len(self.refs),
            "bridge_pid": os.getpid(),
            "namespace": namespace,
            "ray_tasks": self.ray_tasks,
        }
        self.writer.send({"stats": [request, stats]})


def as_bytes(blob):
    """A blob from a task: bytes, or for a large one a bytearray or a Blob."""
    return blob if isinstance(blob, bytes) else bytes(blob)


class Unreachable(Exception):
    """Nothing answers at the cluster's address."""


def probe(address):
    """Fails fast when nothing listens at the address: Ray itself would wait for minutes."""
    target = address[len("ray://"):] if address.startswith("ray://") else address
    if target in ("auto", "local") or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
            return
        except ValueError as error:
            raise Unreachable(f"{target} is not a host:port address ({error})") from None
        except OSError as error:
            if time.monotonic() > deadline:
                raise Unreachable(
                    f"nothing answers at {target} ({error}); check that the cluster is running and the address is right"
                ) from None
            time.sleep(0.25)


def refused_token(error):
    """Whether Ray's error says the cluster refused this driver's token."""
    text = f"{error!r} {error.__cause__!r}"
    return any(word in text for word in ("AuthenticationError", "InvalidAuthToken", "Unauthenticated"))


def connect(ray, address, kwargs):
    """ray.init for an existing cluster. Ray Client's server sometimes fails to start a
    session for a new client; asking again gets one."""
    attempts = 3 if address.startswith("ray://") else 1
    for attempt in range(1, attempts + 1):
        try:
            return ray.init(address=address, **kwargs)
        except ConnectionError as error:
            if refused_token(error) or attempt == attempts:
                raise
            log(f"Ray Client connection failed ({error}); trying again ({attempt}/{attempts - 1})")
            try:
                ray.shutdown()
            except Exception:
                pass


def classify(error):
    """The run's final state kind and a one-line message for a Ray error. The trampoline
    reports task failures in the status it returns, so an error here means Ray could not
    run the task to its end: it crashed, unless it was cancelled."""
    cause = getattr(error, "cause", None)
    if "TaskCancelledError" in (type(error).__name__, type(cause).__name__):
        return "cancelled", "the task was cancelled in Ray"
    if type(cause).__name__ == "ExecutorCrashed":
        return "crashed", str(cause)
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return "crashed", f"{type(error).__name__}: {lines[-1] if lines else 'no details'}"


def main():
    # Unbuffered, so reading returns what has arrived: the commands after the first (the
    # configuration, a length-prefixed frame) are a plain stream of MessagePack values.
    commands = os.fdopen(0, "rb", buffering=0)
    replies = os.dup(1)
    os.dup2(2, 1)
    writer = Writer(replies)

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    # The bridge has a process group of its own, so a terminal's Ctrl-C never reaches it;
    # SIGINT must not be ignored here, or Ray's workers inherit that and ray.cancel breaks.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    config = read_frame(commands)
    if config is None:
        return 0
    bridge = None
    try:
        try:
            import ray  # noqa: F401
        except ImportError as error:
            writer.send({"fatal": [f"Ray is not installed for {sys.executable} ({error})", ""]})
            return 1
        bridge = Bridge(writer, config)
        try:
            bridge.start()
        except Exception as error:
            lines = [line for line in str(error).strip().splitlines() if line.strip()]
            message = f"{type(error).__name__}: {lines[0] if lines else ''}"
            if refused_token(error):
                message = "the cluster refused this driver's authentication token; pass the cluster's token with .auth_token(...) or RAY_AUTH_TOKEN"
            elif isinstance(error, Unreachable):
                message = str(error)
            writer.send({"fatal": [message, traceback.format_exc()]})
            return 1
        handlers = {
            "define": bridge.define,
            "submit": bridge.submit,
            "submit_batch": bridge.submit_batch,
            "get": bridge.get,
            "release": bridge.release,
            "cancel": bridge.cancel,
            "stats": bridge.stats,
        }
        for message in msgpack.Unpacker(commands, raw=False, read_size=1 << 16, max_buffer_size=2**31 - 1):
            if message == "shutdown":
                break
            ((name, arguments),) = message.items()
            handler = handlers.get(name)
            if handler is None:
                log(f"unknown command {name!r}")
                continue
            try:
                handler(*arguments)
            except Exception:
                log(f"command {name} failed:\n{traceback.format_exc()}")
    finally:
        if bridge is not None:
            try:
                bridge.stop()
            except Exception:
                log(f"ray.shutdown failed:\n{traceback.format_exc()}")
        writer.send("bye")
        writer.close()
        # Everything the runner set up for this bridge goes with it, also when the runner
        # died without a word (its stdin closed).
        shutil.rmtree(config.get("own_dir") or config.get("temp_dir") or "", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
