"""MessagePack encoding of the protocol's messages (see protocol.py)."""

from __future__ import annotations

import enum
import struct
from typing import Any, BinaryIO

import msgpack

from .protocol import COMMANDS, REPLY_NAMES, Command, Reply, read_exactly


def _plain(value: Any) -> Any:
    """A value as MessagePack should see it: enums as their strings, records as arrays."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def encode_reply(reply: Reply | str) -> bytes:
    """A reply's MessagePack body; a unit reply (``bye``) is its name."""
    message = reply if isinstance(reply, str) else {REPLY_NAMES[type(reply)]: _plain(reply)}
    packed: bytes = msgpack.packb(message, use_bin_type=True)
    return packed


def encode_command(command: Command | str) -> bytes:
    """A command's MessagePack body (the program's side, for tests)."""
    if isinstance(command, str):
        message: Any = command
    else:
        message = {next(name for name, kind in COMMANDS.items() if isinstance(command, kind)): _plain(command)}
    packed: bytes = msgpack.packb(message, use_bin_type=True)
    return packed


def read_frame(stream: BinaryIO) -> Any:
    """The next length-prefixed MessagePack frame, decoded; ``None`` at the end."""
    header = read_exactly(stream, 4)
    if header is None:
        return None
    (length,) = struct.unpack("<I", header)
    body = read_exactly(stream, length)
    if body is None:
        return None
    return msgpack.unpackb(body, raw=False)
