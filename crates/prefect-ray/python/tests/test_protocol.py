"""The protocol as the Python side speaks it, against the golden fixtures that the Rust
side's tests (src/protocol/golden.rs) check too."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from prefect_ray_worker import codec
from prefect_ray_worker.protocol import (
    COMPLETED,
    IN_FILE,
    MANY_RUNS,
    ONE_RUN,
    RESTART,
    SHIPPED_PREFIX,
    BatchDone,
    BridgeStats,
    Cancel,
    ClusterInfo,
    Command,
    Define,
    Dependencies,
    Died,
    Done,
    Failed,
    FailureKind,
    Fatal,
    FatalKind,
    Get,
    Live,
    LiveLine,
    LogLevel,
    LogRecord,
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
    parse_live,
    parts_header,
)

FIXTURES = Path(__file__).resolve().parents[2] / "src" / "protocol" / "fixtures"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


COMMANDS: dict[str, Command] = {
    "define": Define(3, "shout", '{"num_cpus":2}'),
    "submit": Submit(70_000, 3, bytes([ONE_RUN, 0x81, 0xA1, ord("a"), 0x01]), [1, 300], [5]),
    "submit_batch": SubmitBatch(
        [8, 9],
        1,
        bytes([MANY_RUNS, 0x92, 0xC4, 0x01, 0x80, 0xC4, 0x01, 0x80]),
        [Dependencies([2], []), Dependencies([], [3, 4])],
    ),
    "get": Get(12, 8),
    "release": Release([1, 2, 4_294_967_296]),
    "cancel": Cancel(9),
    "stats": Stats(13),
}

REPLIES: dict[str, Reply] = {
    "ready": ClusterInfo(2, 3.0, "127.0.0.1:8265", "2.60.0", False),
    "fatal": Fatal(
        FatalKind.TOKEN_REFUSED,
        "the cluster refused this driver's authentication token",
        "Traceback (most recent call last): ...",
    ),
    "died": Died("BufferFull: the command was larger than the buffer", "Traceback (most recent call last): ..."),
    "log": LogRecord(LogLevel.WARNING, "ray.worker", "a warning from Ray"),
    "done": Done(70_000, bytes([COMPLETED, 1, 0, 0, 0, 0x90])),
    "batch_done": BatchDone([8, 9], bytes([0x92, 0xC4, 0x00, 0xC4, 0x00])),
    "failed": Failed(9, FailureKind.CANCELLED, "the task was cancelled in Ray"),
    "value": ValueReply(12, bytes([COMPLETED, 0x2A])),
    "value_error": NoValue(12, "the value was already released"),
    "stats": StatsReply(13, BridgeStats(123_456_789, 4, 4321, "prefect", 17)),
    "live": Live(
        [
            LiveLine("0" * 31 + "1", 4321, None, 1_800_000_000_000_000, "", ""),
            LiveLine("0" * 31 + "1", 4321, 0, 1_800_000_000_000_001, "o", "training epoch 1"),
        ]
    ),
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_commands_decode_from_and_encode_to_the_fixtures(name: str) -> None:
    data = fixture(f"command_{name}.msgpack")
    assert decode_command(msgpack.unpackb(data, raw=False)) == COMMANDS[name]
    assert codec.encode_command(COMMANDS[name]) == data


def test_shutdown_is_a_bare_name() -> None:
    data = fixture("command_shutdown.msgpack")
    assert decode_command(msgpack.unpackb(data, raw=False)) is None
    assert codec.encode_command("shutdown") == data


@pytest.mark.parametrize("name", sorted(REPLIES))
def test_replies_encode_to_the_fixtures(name: str) -> None:
    assert codec.encode_reply(REPLIES[name]) == fixture(f"reply_{name}.msgpack")


def test_bye_is_a_bare_name_in_a_frame() -> None:
    assert codec.encode_reply("bye") == fixture("reply_bye.msgpack")
    assert frame(codec.encode_reply("bye")) == fixture("reply_bye.frame")


def test_the_configuration_is_a_map_of_named_keys() -> None:
    import io

    config = codec.read_frame(io.BytesIO(frame(fixture("config.msgpack"))))
    assert config == {
        "address": "ray://127.0.0.1:10001",
        "init_kwargs": {"namespace": "prefect", "num_cpus": 2},
        "temp_dir": "/tmp/prefect-ray-x/ray",
        "worker_package": "/tmp/prefect-ray-x/modules/prefect_ray_worker",
        "own_dir": "/tmp/prefect-ray-x",
        "executor": f"{SHIPPED_PREFIX}count_to",
        "max_batch": 64,
    }


def test_parts_frames_match_the_executors() -> None:
    in_file = bytes([IN_FILE]) + b"/dev/shm/prefect-ray-1-0"
    call = [bytes([ONE_RUN]) + b"header", in_file, bytes([COMPLETED, 0x2A])]
    assert parts_header([len(p) for p in call]) + b"".join(call) == fixture("executor_call.parts")
    reply = [b"report", bytes([COMPLETED, 0x07]), RESTART]
    assert parts_header([len(p) for p in reply]) + b"".join(reply) == fixture("executor_reply.parts")


def test_a_cut_frame_reads_as_the_end() -> None:
    import io

    whole = frame(codec.encode_reply(REPLIES["done"]))
    assert codec.read_frame(io.BytesIO(whole)) == {"done": [70_000, bytes([COMPLETED, 1, 0, 0, 0, 0x90])]}
    assert codec.read_frame(io.BytesIO(whole[:-1])) is None
    assert codec.read_frame(io.BytesIO(b"")) is None


def test_an_unknown_command_is_refused_by_name() -> None:
    with pytest.raises(UnknownCommand, match="unknown command 'launch'"):
        decode_command({"launch": [1]})
    with pytest.raises(UnknownCommand, match="not a command"):
        decode_command([1, 2])


def test_marked_lines_of_worker_logs_parse_with_or_without_rays_prefix() -> None:
    run = "0" * 31 + "1"
    assert parse_live(f"[prefect-run {run} 42 7 1800000000123456 3] hello [world]") == LiveLine(
        run, 42, 7, 1_800_000_000_123_456, "3", "hello [world]"
    )
    assert parse_live(f"(trampoline pid=42) [prefect-run {run} 42 started 1800000000000000]") == LiveLine(
        run, 42, None, 1_800_000_000_000_000, "", ""
    )
    assert parse_live(f"[prefect-run {run} 42 0 1800000000000000 o] ") == LiveLine(run, 42, 0, 1_800_000_000_000_000, "o", "")
    assert parse_live(f"[prefect-run {run} 42 progress 1800000000000000] 0.25") == LiveLine(
        run, 42, None, 1_800_000_000_000_000, "p", "0.25"
    )
    assert parse_live(f"[prefect-run {run} 42 progress 1800000000000000] most") is None
    assert parse_live("an unmarked line") is None
    assert parse_live(f"[prefect-run {run} 42 seven 1 o] text") is None
