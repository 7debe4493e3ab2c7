"""A minimal GGUF walker for tests: finds where each metadata value lies in a file, so tests can
rewrite one value (rename tokens) or break a file on purpose. Independent of gemma_rs's reader.

Format: llama.cpp's docs/gguf.md (little-endian; strings are a u64 length then UTF-8 bytes).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Value types of gguf.h: fixed sizes; 8 is a string, 9 an array.
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9


@dataclass
class Layout:
    n_tensors: int
    kv: dict[str, tuple[int, int, int]]  # key -> (start of the key entry, start of value, end)
    infos_start: int  # first tensor info
    infos: list[tuple[str, int, int]]  # (name, offset of its type u32, offset of its offset u64)
    data_start: int


def _skip_value(buf: bytes, pos: int, ty: int) -> int:
    if ty in _FIXED:
        return pos + _FIXED[ty]
    if ty == STRING:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return pos + 8 + n
    if ty == ARRAY:
        elem, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if elem in _FIXED:
            return pos + count * _FIXED[elem]
        for _ in range(count):
            pos = _skip_value(buf, pos, elem)
        return pos
    raise ValueError(f"value type {ty}")


def _string(buf: bytes, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    return buf[pos + 8 : pos + 8 + n].decode(), pos + 8 + n


def layout(buf: bytes) -> Layout:
    assert buf[:4] == b"GGUF"
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    pos, kv, alignment = 24, {}, 32
    for _ in range(n_kv):
        entry = pos
        key, pos = _string(buf, pos)
        (ty,) = struct.unpack_from("<I", buf, pos)
        end = _skip_value(buf, pos + 4, ty)
        kv[key] = (entry, pos, end)
        if key == "general.alignment":
            (alignment,) = struct.unpack_from("<I", buf, pos + 4)
        pos = end
    infos_start, infos = pos, []
    for _ in range(n_tensors):
        name, pos = _string(buf, pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        pos += 4 + 8 * n_dims
        infos.append((name, pos, pos + 4))
        pos += 12
    data_start = -(-pos // alignment) * alignment
    return Layout(n_tensors, kv, infos_start, infos, data_start)


_SCALAR = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
    12: "<d",
}  # fmt: skip


def _read(buf: bytes, pos: int, ty: int) -> tuple[object, int]:
    if ty in _SCALAR:
        return struct.unpack_from(_SCALAR[ty], buf, pos)[0], pos + _FIXED[ty]
    if ty == STRING:
        return _string(buf, pos)
    elem, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if elem in _SCALAR:
        fmt = f"<{count}{_SCALAR[elem][1]}"
        return list(struct.unpack_from(fmt, buf, pos)), pos + count * _FIXED[elem]
    out = []
    for _ in range(count):
        v, pos = _read(buf, pos, elem)
        out.append(v)
    return out, pos


def metadata(buf: bytes) -> dict[str, object]:
    """Every metadata value, decoded."""
    out = {}
    for key, (_, value, _) in layout(buf).kv.items():
        (ty,) = struct.unpack_from("<I", buf, value)
        out[key] = _read(buf, value + 4, ty)[0]
    return out


def tensors(buf: bytes) -> dict[str, tuple[int, bytes]]:
    """Each tensor's ggml type id and its first 64 data bytes."""
    lay = layout(buf)
    out = {}
    for name, type_at, offset_at in lay.infos:
        (ty,) = struct.unpack_from("<I", buf, type_at)
        (off,) = struct.unpack_from("<Q", buf, offset_at)
        out[name] = (ty, buf[lay.data_start + off : lay.data_start + off + 64])
    return out


def string_array(values: list[str]) -> bytes:
    """The bytes of a metadata value of type array-of-strings (type tag included)."""
    out = [struct.pack("<IIQ", ARRAY, STRING, len(values))]
    for v in values:
        b = v.encode()
        out.append(struct.pack("<Q", len(b)) + b)
    return b"".join(out)


def read_strings(buf: bytes, key: str) -> list[str]:
    _, value, _ = layout(buf).kv[key]
    elem, count = struct.unpack_from("<IIQ", buf, value)[1:]
    assert elem == STRING
    pos, out = value + 16, []
    for _ in range(count):
        s, pos = _string(buf, pos)
        out.append(s)
    return out


def replace_value(buf: bytes, key: str, value: bytes) -> bytes:
    """`buf` with metadata `key`'s value (type tag included) replaced; the tensor data moves to
    the next aligned offset, its relative offsets unchanged."""
    lay = layout(buf)
    _, start, end = lay.kv[key]
    head = buf[:start] + value + buf[end : _infos_end(lay)]
    head += b"\0" * (-len(head) % 32)  # the default alignment (the files here do not set one)
    return head + buf[lay.data_start :]


def _infos_end(lay: Layout) -> int:
    """Where the last tensor info ends."""
    return lay.infos[-1][2] + 8 if lay.infos else lay.infos_start
