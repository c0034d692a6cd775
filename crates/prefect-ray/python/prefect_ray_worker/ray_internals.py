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


def check_gcs(address: str, wait: float) -> None:
    """Asks the GCS at `address` for the cluster's id, with this driver's token, before
    `ray.init` does: `ray.init` answers a refused token with a bare ConnectionError after
    20 s, and a closed port after minutes. Tries again for up to `wait` seconds while
    nothing answers, for a cluster that is still starting.

    Uses `ray._private.grpc_utils.init_grpc_channel`, the channel Ray's own clients use
    (it adds the token the way the cluster expects it), and the generated GCS stubs."""
    import grpc
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    deadline = time.monotonic() + wait
    channel = init_grpc_channel(address)
    try:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        while True:
            try:
                stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=max(1.0, wait))
                check_versions(channel, wait)
                return
            except grpc.RpcError as error:
                code = error.code()
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    raise TokenRefused(address) from None
                if code != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    details = error.details()
                    raise Unreachable(
                        f"nothing answers at {address} ({details}); check that the cluster is running and the address is right"
                    ) from None
                time.sleep(0.25)
    finally:
        channel.close()


def check_client(address: str, wait: float) -> None:
    """Pings the Ray Client server at `address` (``ray://host:port``) with this driver's
    token, before `ray.init` does: Ray Client takes a refused token for a server that is not
    up yet and retries for 90 s, then says only that the connection timed out.

    Uses `init_grpc_channel` (as `check_gcs`) and Ray Client's generated stubs, with the
    ping Ray Client itself sends (`ClusterInfo` of type PING)."""
    import grpc
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc

    target = address[len("ray://") :]
    deadline = time.monotonic() + wait
    channel = init_grpc_channel(target)
    try:
        stub = ray_client_pb2_grpc.RayletDriverStub(channel)
        while True:
            try:
                stub.ClusterInfo(
                    ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING), timeout=max(1.0, wait)
                )
                return
            except grpc.RpcError as error:
                code = error.code()
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    raise TokenRefused(address) from None
                if code != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    # Not ours to judge (a proxy, a server that answers otherwise): Ray
                    # Client's own connection attempt says more.
                    return
                time.sleep(0.25)
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
