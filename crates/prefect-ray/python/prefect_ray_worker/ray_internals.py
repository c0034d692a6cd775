"""Every use of Ray's private API, in one place, each with why no public one will do. If a
Ray release changes one of these, this is the file to change."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from typing import Any

from .driver import TokenRefused, Unreachable, VersionMismatch, version_mismatch


def when_ready(ref: Any, callback: Callable[[Any], None]) -> None:
    """Calls `callback` with the object's value (or the error that stands for it) once Ray
    has it, on a thread of Ray's.

    Uses `ObjectRef._on_completed`: the public alternatives either block a thread per run
    (`ray.get`) or poll (`ray.wait`), and `ObjectRef.future()` adds an asyncio hop per run."""
    ref._on_completed(callback)


def _until_answered(call: Callable[[], Any], address: str, wait: float) -> Exception | None:
    """Makes a gRPC `call` until the server answers it; returns ``None`` then. A refused
    token raises `TokenRefused` at once; while nothing answers (a cluster that is still
    starting) it tries again for up to `wait` seconds. Returns the last error otherwise."""
    import grpc

    deadline = time.monotonic() + wait
    while True:
        try:
            call()
            return None
        except grpc.RpcError as error:
            code = error.code()
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise TokenRefused(address) from None
            if code != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                failure: Exception = error
                return failure
            time.sleep(0.25)


def check_gcs(address: str, wait: float) -> None:
    """Asks the GCS at `address` for the cluster's id, with this driver's token, before
    `ray.init` does: `ray.init` answers a refused token with a bare ConnectionError after
    20 s, and a closed port after minutes. Then compares versions (`check_versions`).

    Uses `ray._private.grpc_utils.init_grpc_channel`, the channel Ray's own clients use
    (it adds the token the way the cluster expects it), and the generated GCS stubs."""
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    channel = init_grpc_channel(address)
    try:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        request = gcs_service_pb2.GetClusterIdRequest()
        error = _until_answered(lambda: stub.GetClusterId(request, timeout=max(1.0, wait)), address, wait)
        if error is not None:
            details = error.details()  # type: ignore[attr-defined]
            raise Unreachable(
                f"nothing answers at {address} ({details}); check that the cluster is running and the address is right"
            )
        check_versions(channel, wait)
    finally:
        channel.close()


def check_client(address: str, wait: float) -> None:
    """Pings the Ray Client server at `address` (``ray://host:port``) with this driver's
    token, before `ray.init` does: Ray Client takes a refused token for a server that is not
    up yet and retries for 90 s, then says only that the connection timed out. Any other
    answer is not ours to judge (a proxy, say): Ray Client's own attempt says more.

    Uses `init_grpc_channel` (as `check_gcs`) and Ray Client's generated stubs, with the
    ping Ray Client itself sends (`ClusterInfo` of type PING)."""
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc

    channel = init_grpc_channel(address[len("ray://") :])
    try:
        stub = ray_client_pb2_grpc.RayletDriverStub(channel)
        ping = ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING)
        _until_answered(lambda: stub.ClusterInfo(ping, timeout=max(1.0, wait)), address, wait)
    finally:
        channel.close()


def check_versions(channel: Any, wait: float) -> None:
    """Compares the Ray and Python versions the cluster keeps in its GCS (the metadata
    `ray.init` itself checks) with this driver's, and raises `VersionMismatch` naming both:
    `ray.init` says only that they differ, after connecting.

    Uses the GCS's internal key-value store (`InternalKVGet`, namespace "cluster", key
    "CLUSTER_METADATA"), which Ray writes when the head starts."""
    import ray
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    stub = gcs_service_pb2_grpc.InternalKVGcsServiceStub(channel)
    request = gcs_service_pb2.InternalKVGetRequest(namespace=b"cluster", key=b"CLUSTER_METADATA")
    answer = stub.InternalKVGet(request, timeout=max(1.0, wait))
    try:
        metadata = json.loads(answer.value or b"{}")
    except ValueError:
        return
    level = os.environ.get("RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL", "patch")
    mismatch = version_mismatch(metadata, ray.__version__, platform.python_version(), level)
    if mismatch:
        raise VersionMismatch(mismatch)


def stream_live_output(send: Callable[[list[Any]], None], through_client: bool) -> None:
    """Sends the marked lines of worker logs to `send` as Ray's log streaming brings them
    to this driver (``log_to_driver``), instead of printing them; other lines are dropped.

    Ray has no public hook for the lines it streams to a driver. Through a GCS address the
    driver's log thread hands each batch to `global_worker_stdstream_dispatcher`, whose
    printing handler is replaced here (call after ``ray.init``). Through Ray Client the lines
    arrive in `LogstreamClient.stdstream`, replaced here (call before ``ray.init``)."""
    from .protocol import parse_live

    def forward(lines: Any) -> None:
        marked = [line for line in (parse_live(str(text)) for text in lines) if line is not None]
        if marked:
            send(marked)

    if through_client:
        from ray.util.client.logsclient import LogstreamClient

        def stdstream(self: Any, level: int, msg: str) -> None:
            forward(msg.splitlines())

        LogstreamClient.stdstream = stdstream
        return
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
    global_worker_stdstream_dispatcher.add_handler("prefect_live", lambda data: forward(data.get("lines") or []))
