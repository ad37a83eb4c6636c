"""Canonical byte encoding of protobuf messages and plain values, for signatures and HMACs.

Protobuf serialisation is not canonical (field order, unknown fields, default elision and map
order may differ between implementations), so nothing signs protobuf bytes. Instead a message
is encoded by walking its descriptor:

* fields in ascending field-number order, every declared field, defaults included, each as
  ``u32 field number`` followed by its value;
* values carry a one-byte type tag: ``i`` integer / enum (9-byte signed big-endian), ``b`` bool
  (1 byte), ``d`` double / float (IEEE-754 big-endian binary64), ``s`` string and ``y`` bytes
  (u64 length, then UTF-8 / raw bytes), ``m`` sub-message (u64 length, then its encoding),
  ``n`` an absent sub-message, ``r`` a repeated field (u64 count, then the elements);
* map fields are refused (the protocol has none).

Every signed byte string starts with a domain tag (e.g. ``"lioncub.v1/chunk"``), so a signature
made for one message type can never verify as another.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import cast

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

__all__ = ["Value", "encode_message", "encode_values", "signing_bytes"]

Value = int | bool | float | str | bytes

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_F64 = struct.Struct(">d")

_INT_TYPES = frozenset(
    {
        FieldDescriptor.CPPTYPE_INT32,
        FieldDescriptor.CPPTYPE_INT64,
        FieldDescriptor.CPPTYPE_UINT32,
        FieldDescriptor.CPPTYPE_UINT64,
        FieldDescriptor.CPPTYPE_ENUM,
    }
)


def _encode_value(value: Value) -> bytes:
    if isinstance(value, bool):  # before int: bool is an int subclass
        return b"b" + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        return b"i" + value.to_bytes(9, "big", signed=True)
    if isinstance(value, float):
        return b"d" + _F64.pack(value)
    if isinstance(value, str):
        raw = value.encode("utf-8")
        return b"s" + _U64.pack(len(raw)) + raw
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        return b"y" + _U64.pack(len(raw)) + raw
    raise TypeError(f"cannot canonically encode a value of type {type(value).__name__}")


def encode_values(*values: Value) -> bytes:
    """Canonical encoding of a sequence of plain values (self-delimiting, unambiguous)."""
    return b"".join(_encode_value(v) for v in values)


def _encode_field_value(field: FieldDescriptor, value: object) -> bytes:
    if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
        assert isinstance(value, Message)
        inner = encode_message(value)
        return b"m" + _U64.pack(len(inner)) + inner
    if field.cpp_type in _INT_TYPES:
        assert isinstance(value, int)
        return _encode_value(int(value))
    if field.cpp_type == FieldDescriptor.CPPTYPE_BOOL:
        return _encode_value(bool(value))
    if field.cpp_type in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
        assert isinstance(value, float | int)
        return _encode_value(float(value))
    if field.type == FieldDescriptor.TYPE_BYTES:
        assert isinstance(value, bytes)
        return _encode_value(value)
    assert isinstance(value, str), field.full_name
    return _encode_value(value)


def encode_message(msg: Message, *, skip: Iterable[str] = ()) -> bytes:
    """Canonical encoding of ``msg``; top-level fields named in ``skip`` are left out."""
    skipped = frozenset(skip)
    parts: list[bytes] = []
    descriptor = cast(Descriptor, msg.DESCRIPTOR)
    for field in sorted(descriptor.fields, key=lambda f: f.number):
        if field.name in skipped:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            raise TypeError(f"map field {field.full_name} has no canonical encoding")
        parts.append(_U32.pack(field.number))
        value = getattr(msg, field.name)
        if field.is_repeated:
            items = list(value)
            parts.append(b"r" + _U64.pack(len(items)))
            parts.extend(_encode_field_value(field, item) for item in items)
        elif field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE and not msg.HasField(field.name):
            parts.append(b"n")
        else:
            parts.append(_encode_field_value(field, value))
    return b"".join(parts)


def signing_bytes(domain: str, msg: Message, *extra: Value, skip: Iterable[str] = ("signature",)) -> bytes:
    """What gets signed for ``msg``: domain tag, canonical fields (minus ``skip``), then ``extra``."""
    inner = encode_message(msg, skip=skip)
    return encode_values(domain) + b"m" + _U64.pack(len(inner)) + inner + encode_values(*extra)
