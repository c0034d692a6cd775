"""The bridge's process loop without Ray: what it sends the program when its command stream
fails, and where its log records go."""

from __future__ import annotations

import io
import logging
from typing import Any

import msgpack
import pytest

import prefect_ray_bridge as bridge
from prefect_ray_worker.driver import route_logs
from prefect_ray_worker.protocol import Died, LogLevel, LogRecord


class Recorder:
    """A Writer that keeps what the bridge sends."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, reply: Any) -> None:
        self.sent.append(reply)


class Unstarted(bridge.Bridge):
    """A bridge whose start and stop need no Ray."""

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


def test_a_command_stream_that_breaks_ends_the_bridge_with_its_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bridge, "Bridge", Unstarted)
    writer = Recorder()
    # A map header that promises 2**32 - 1 entries: the unpacker refuses it, as it refuses
    # a value too large for its buffer.
    broken = io.BytesIO(b"\xdf\xff\xff\xff\xff\xa1")
    status = bridge.serve(broken, writer, {})  # type: ignore[arg-type]
    assert status == 1
    [died] = writer.sent
    assert isinstance(died, Died)
    assert died.message.startswith("ValueError: 4294967295 exceeds max_map_len")
    assert "Traceback" in died.details


def test_a_clean_end_of_commands_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bridge, "Bridge", Unstarted)
    writer = Recorder()
    assert bridge.serve(io.BytesIO(msgpack.packb("shutdown")), writer, {}) == 0  # type: ignore[arg-type]
    assert writer.sent == []


def test_log_records_reach_the_program_at_their_level() -> None:
    sent: list[LogRecord] = []
    logger = logging.getLogger("ray.test_bridge")
    handler = route_logs(sent.append, loggers=("ray.test_bridge",))
    try:
        logger.warning("the object store is %d%% full", 95)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("a callback failed")
        logger.debug("not sent: below the logger's level")
    finally:
        logger.removeHandler(handler)
    assert sent[0] == LogRecord(LogLevel.WARNING, "ray.test_bridge", "the object store is 95% full")
    assert sent[1].level is LogLevel.ERROR
    assert sent[1].message.startswith("a callback failed\nTraceback")
    assert "RuntimeError: boom" in sent[1].message
    assert len(sent) == 2


def test_routing_replaces_console_handlers_and_keeps_files(tmp_path: Any) -> None:
    logger = logging.getLogger("ray.test_bridge.handlers")
    console = logging.StreamHandler()
    file = logging.FileHandler(tmp_path / "log.txt")
    logger.addHandler(console)
    logger.addHandler(file)
    handler = route_logs(lambda record: None, loggers=("ray.test_bridge.handlers",))
    try:
        assert logger.handlers == [file, handler]
    finally:
        for each in list(logger.handlers):
            logger.removeHandler(each)
        file.close()
