"""The message codec every transport shares: a boundary value as bytes, and back, without pickle.

A message is a *head* followed by the value's tensors::

    prefix   magic b"CVM1", metadata bytes (u32), inline flag (u32), reserved (u32), data bytes (u64)
    metadata the value's structure and each tensor's (dtype, requires_grad, shape), see below
    padding  up to a 16-byte boundary: the data starts there
    data     each tensor's bytes at 16-byte offsets (derived from the shapes, never sent)

*Inline* messages carry their data right after the head; otherwise the data travels as a
separate transfer that the transport pairs with the head.

The metadata is a small explicit encoding, so nothing a peer sends is ever unpickled: tags of
one byte for ``None``, ``True``, ``False``, integers, floats, strings, tuples, named tuples,
lists, dicts (constant keys) and tensor placeholders, then one record per tensor. Decoding
checks every length and index and raises :class:`MessageError` for anything it did not itself
write. Encoding stays off the hot path: a :class:`Described` is kept per link and reused
while values keep the same structure, shapes and dtypes; receivers cache decoded metadata by
its bytes.
"""

from __future__ import annotations

import collections
import struct
import sys
from typing import Any

import torch

from .bundle import Leaf, flatten, unflatten

__all__ = ["ALIGN", "PREFIX", "MessageError", "Described", "Slot", "pad", "nbytes", "pack", "describe", "encode",
           "encode_metadata", "decode_metadata", "decode_head", "unpack", "DTYPES"]

ALIGN = 16
MAGIC = b"CVM1"
PREFIX = struct.Struct("<4sIIIQ")  # magic, metadata bytes, 1 if the data is inline, reserved, data bytes
MAX_DEPTH = 64  # nesting a decoded structure may have
MAX_DIMS = 64

_DTYPE_NAMES = ("float32", "float64", "float16", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "bool",
                "complex64", "complex128", "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2",
                "float8_e4m3fnuz", "float8_e5m2fnuz", "complex32")
# a dtype's code is its position in _DTYPE_NAMES (the same on every rank of a job); absent ones are skipped
DTYPES: dict[int, torch.dtype] = {code: getattr(torch, name) for code, name in enumerate(_DTYPE_NAMES)
                                  if isinstance(getattr(torch, name, None), torch.dtype)}
_DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}

Spec = tuple[tuple[int, ...], torch.dtype, bool]  # a tensor's shape, dtype, requires-grad flag


class MessageError(ValueError):
    """Bytes that are not a message this codec wrote (truncated, corrupted or foreign)."""


def pad(n: int) -> int:
    """``n`` rounded up to the alignment of tensors in a message."""
    return (n + ALIGN - 1) // ALIGN * ALIGN


def nbytes(shape: tuple, dtype: torch.dtype) -> int:
    count = 1
    for size in shape:
        count *= size
    return count * dtype.itemsize


def pack(tensors: list[torch.Tensor], into: torch.Tensor) -> None:
    """Copy contiguous ``tensors`` into the byte buffer ``into`` at their message offsets."""
    offset = 0
    for tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if size:
            into[offset:offset + size].copy_(tensor.reshape(-1).view(torch.uint8))
        offset += pad(size)


# --- metadata: structure and specs as bytes ------------------------------------------------------
_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
_SPEC = struct.Struct("<BBB")  # dtype code, requires grad, number of dimensions


def encode_metadata(structure: Any, specs: list[Spec]) -> bytes:
    """The metadata bytes of a flattened value (``structure`` from :func:`~.bundle.flatten`)."""
    out = bytearray()
    _encode_item(structure, out, 0)
    out += _U32.pack(len(specs))
    for shape, dtype, requires_grad in specs:
        code = _DTYPE_CODES.get(dtype)
        if code is None:
            raise TypeError(f"a tensor of dtype {dtype} cannot cross a stage boundary: convert it to one of "
                            f"{', '.join(str(d) for d in DTYPES.values())}")
        if len(shape) > MAX_DIMS:
            raise TypeError(f"a tensor of {len(shape)} dimensions cannot cross a stage boundary (at most {MAX_DIMS})")
        out += _SPEC.pack(code, int(requires_grad), len(shape))
        out += struct.pack(f"<{len(shape)}q", *shape)
    return bytes(out)


def _encode_item(item: Any, out: bytearray, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise TypeError(f"a boundary value nested deeper than {MAX_DEPTH} levels cannot cross a stage boundary")
    if isinstance(item, Leaf):
        out += b"L" + _U32.pack(item.index)
    elif item is None:
        out += b"N"
    elif item is True:
        out += b"T"
    elif item is False:
        out += b"F"
    elif isinstance(item, int):
        if -(1 << 63) <= item < (1 << 63):
            out += b"i" + _I64.pack(item)
        else:
            raw = int(item).to_bytes((item.bit_length() + 8) // 8, "little", signed=True)
            out += b"I" + _U32.pack(len(raw)) + raw
    elif isinstance(item, float):
        out += b"f" + _F64.pack(item)
    elif isinstance(item, str):
        raw = item.encode("utf-8", "surrogatepass")
        out += b"s" + _U32.pack(len(raw)) + raw
    elif isinstance(item, tuple):
        fields = getattr(type(item), "_fields", None)
        if fields is not None:  # a named tuple: its class is found again by module and name
            cls = type(item)
            out += b"n" + _U32.pack(len(fields))
            for text in (cls.__module__, cls.__qualname__, *fields):
                raw = text.encode("utf-8")
                out += _U32.pack(len(raw)) + raw
        else:
            out += b"t" + _U32.pack(len(item))
        for x in item:
            _encode_item(x, out, depth + 1)
    elif isinstance(item, list):
        out += b"l" + _U32.pack(len(item))
        for x in item:
            _encode_item(x, out, depth + 1)
    elif isinstance(item, dict):
        out += b"d" + _U32.pack(len(item))
        for key, x in item.items():
            if not (key is None or isinstance(key, (bool, int, float, str))):
                raise TypeError(f"a dict key of type {type(key).__name__} cannot cross a stage boundary: use str, "
                                "int, float, bool or None keys")
            _encode_item(key, out, depth + 1)
            _encode_item(x, out, depth + 1)
    else:
        raise TypeError(f"a {type(item).__name__} cannot cross a stage boundary")


class _Reader:
    """Bounds-checked reads from metadata bytes; every failure is a :class:`MessageError`."""

    __slots__ = ("raw", "at", "leaves")

    def __init__(self, raw: bytes) -> None:
        self.raw, self.at, self.leaves = raw, 0, []

    def take(self, n: int) -> bytes:
        end = self.at + n
        if n < 0 or end > len(self.raw):
            raise MessageError(f"the metadata ends early (byte {self.at} of {len(self.raw)}, {n} more needed)")
        chunk = self.raw[self.at:end]
        self.at = end
        return chunk

    def u32(self) -> int:
        return _U32.unpack(self.take(4))[0]

    def count(self, least_bytes_each: int) -> int:
        """A count of items, each at least ``least_bytes_each`` bytes: no more than the bytes left hold."""
        n = self.u32()
        if n * least_bytes_each > len(self.raw) - self.at:
            raise MessageError(f"the metadata announces {n} items but only {len(self.raw) - self.at} bytes follow")
        return n

    def text(self) -> str:
        try:
            return self.take(self.count(1)).decode("utf-8", "surrogatepass")
        except UnicodeDecodeError as error:
            raise MessageError(f"the metadata holds a string that is not UTF-8: {error}") from None


def decode_metadata(raw: bytes) -> tuple[Any, list[Spec]]:
    """(structure, specs) from metadata bytes; :class:`MessageError` unless :func:`encode_metadata`
    wrote them."""
    reader = _Reader(raw)
    structure = _decode_item(reader, 0)
    specs: list[Spec] = []
    for _ in range(reader.count(_SPEC.size)):
        code, requires_grad, ndim = _SPEC.unpack(reader.take(_SPEC.size))
        dtype = DTYPES.get(code)
        if dtype is None:
            raise MessageError(f"the metadata names an unknown dtype (code {code})")
        if requires_grad > 1 or ndim > MAX_DIMS:
            raise MessageError("the metadata holds a malformed tensor record")
        shape = struct.unpack(f"<{ndim}q", reader.take(8 * ndim))
        if any(size < 0 for size in shape):
            raise MessageError(f"the metadata holds a negative tensor size {shape}")
        specs.append((shape, dtype, bool(requires_grad)))
    if reader.at != len(raw):
        raise MessageError(f"{len(raw) - reader.at} stray bytes follow the metadata")
    if reader.leaves != list(range(len(specs))):
        raise MessageError(f"the structure's tensor places {reader.leaves[:8]} do not match its "
                           f"{len(specs)} tensor records")
    return structure, specs


_NAMED: dict[tuple[str, str, tuple[str, ...]], type] = {}


def _named_tuple(module: str, qualname: str, fields: tuple[str, ...]) -> type:
    """The named tuple class ``module.qualname`` if that module is already imported (nothing is
    imported here) and the class has these fields, else a stand-in with the same name and fields."""
    key = (module, qualname, fields)
    cls = _NAMED.get(key)
    if cls is not None:
        return cls
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = found.__dict__.get(part) if found is not None and hasattr(found, "__dict__") else None
    if isinstance(found, type) and issubclass(found, tuple) and getattr(found, "_fields", None) == fields:
        cls = found
    else:
        name = qualname.rsplit(".", 1)[-1]
        try:
            cls = collections.namedtuple(name, fields)  # validates the names: identifiers only
        except ValueError as error:
            raise MessageError(f"the metadata names a malformed named tuple {qualname!r}: {error}") from None
    if len(_NAMED) > 256:
        _NAMED.clear()
    _NAMED[key] = cls
    return cls


def _decode_item(reader: _Reader, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise MessageError(f"the metadata nests deeper than {MAX_DEPTH} levels")
    tag = reader.take(1)
    if tag == b"L":
        index = reader.u32()
        reader.leaves.append(index)
        return Leaf(index)
    if tag == b"N":
        return None
    if tag == b"T":
        return True
    if tag == b"F":
        return False
    if tag == b"i":
        return _I64.unpack(reader.take(8))[0]
    if tag == b"I":
        return int.from_bytes(reader.take(reader.count(1)), "little", signed=True)
    if tag == b"f":
        return _F64.unpack(reader.take(8))[0]
    if tag == b"s":
        return reader.text()
    if tag == b"t":
        return tuple([_decode_item(reader, depth + 1) for _ in range(reader.count(1))])
    if tag == b"n":
        n_fields = reader.count(4)
        module, qualname = reader.text(), reader.text()
        fields = tuple(reader.text() for _ in range(n_fields))
        cls = _named_tuple(module, qualname, fields)
        return cls(*[_decode_item(reader, depth + 1) for _ in range(n_fields)])
    if tag == b"l":
        return [_decode_item(reader, depth + 1) for _ in range(reader.count(1))]
    if tag == b"d":
        result = {}
        for _ in range(reader.count(2)):
            key = _decode_item(reader, depth + 1)
            if isinstance(key, (Leaf, tuple, list, dict)):
                raise MessageError("the metadata holds a dict key that is not a constant")
            result[key] = _decode_item(reader, depth + 1)
        return result
    raise MessageError(f"the metadata holds an unknown tag {tag!r} at byte {reader.at - 1}")


# --- descriptions and message heads -------------------------------------------------------------
class Described:
    """A sent value's metadata and the message head built from it, reused while a link keeps
    sending values of the same structure, shapes and dtypes.

    It also keeps the link's spare message buffers for such values (the direct transport's
    :class:`Slot`: the head already written and a typed view of each tensor's place, so packing
    a value is one ``copy_`` per tensor), and any transport's own encoding of the head
    (``encodings``).
    """

    __slots__ = ("structure", "specs", "meta", "heads", "spare", "start", "places", "data_bytes", "single",
                 "encodings")

    def __init__(self, structure: Any, specs: list[Spec]) -> None:
        self.structure, self.specs = structure, specs
        self.meta = encode_metadata(structure, specs)
        self.heads: dict[bool, torch.Tensor] = {}
        self.spare: dict[int, list[Slot]] = {}  # by capacity: inline message buffers not in flight
        self.start = pad(PREFIX.size + len(self.meta))  # where the data begins in an inline message
        self.places: list[tuple[int, int]] = []  # per tensor: (offset in the data, bytes)
        offset = 0
        for shape, dtype, _ in specs:
            size = nbytes(shape, dtype)
            self.places.append((offset, size))
            offset += pad(size)
        self.data_bytes = offset
        self.single = specs[0] if isinstance(structure, Leaf) else None  # a bare tensor's spec
        self.encodings: dict[Any, Any] = {}

    def head_bytes(self, inline: bool) -> bytes:
        """The message head (prefix, metadata, padding up to the data) as bytes."""
        raw = PREFIX.pack(MAGIC, len(self.meta), int(inline), 0, self.data_bytes) + self.meta
        return raw + bytes(self.start - len(raw))

    def describes(self, value: Any) -> bool:
        """Whether ``value`` is a bare tensor described by this (the common case, decided
        without flattening)."""
        single = self.single
        return (single is not None and isinstance(value, torch.Tensor) and value.shape == single[0]
                and value.dtype is single[1] and value.requires_grad == single[2])

    def head(self, inline: bool) -> torch.Tensor:
        """:meth:`head_bytes` as a tensor (cached)."""
        if inline not in self.heads:
            self.heads[inline] = torch.frombuffer(bytearray(self.head_bytes(inline)), dtype=torch.uint8).clone()
        return self.heads[inline]

    def slot(self, capacity: int) -> Slot:
        """A message buffer of ``capacity`` bytes for an inline value, from the spares or new."""
        spare = self.spare.get(capacity)
        if spare:
            return spare.pop()
        message = torch.empty(capacity, dtype=torch.uint8)
        message[:self.start].copy_(self.head(True))
        places = [message[self.start + offset:self.start + offset + size].view(dtype).view(shape) if size else None
                  for (offset, size), (shape, dtype, _) in zip(self.places, self.specs)]
        return Slot(message, places, self, capacity)


class Slot:
    """One reusable inline message buffer and the typed places of its tensors."""

    __slots__ = ("message", "places", "owner", "capacity")

    def __init__(self, message: torch.Tensor, places: list[torch.Tensor | None], owner: Described,
                 capacity: int) -> None:
        self.message, self.places, self.owner, self.capacity = message, places, owner, capacity

    def fill(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        for place, tensor in zip(self.places, tensors):
            if place is not None:
                place.copy_(tensor.detach() if tensor.requires_grad else tensor)
        return self.message

    def release(self) -> None:
        """The send completed: the buffer may carry the link's next value."""
        self.owner.spare.setdefault(self.capacity, []).append(self)


def describe(value: Any, where: str, previous: Described | None = None) -> tuple[Described, list[torch.Tensor]]:
    """``value``'s description (``previous`` when it describes the value the same way) and its
    tensors."""
    if previous is not None and previous.describes(value):
        return previous, [value]
    structure, originals = flatten(value, where)
    specs = [(tuple(t.shape), t.dtype, t.requires_grad) for t in originals]
    same = previous is not None and previous.specs == specs and previous.structure == structure
    return (previous if same and previous is not None else Described(structure, specs)), originals


def encode(value: Any, where: str, capacity: int, previous: Described | None = None
           ) -> tuple[torch.Tensor | Slot, torch.Tensor | None, int, Described]:
    """(message of ``capacity`` bytes, separate data buffer or None, bytes the value needs, its
    description, reusing ``previous`` when the value is described the same way). An inline
    value on CPU comes as a filled :class:`Slot` (release it when its send completes)."""
    described, originals = describe(value, where, previous)
    start, data_bytes = described.start, described.data_bytes
    needed = start + data_bytes
    if start > capacity:
        raise ValueError(f"{where} has too many tensors ({len(originals)}) to describe in {capacity} bytes; "
                         "merge them into fewer tensors")
    on_cpu = all(t.is_cpu for t in originals)
    if on_cpu and needed <= capacity:
        slot = described.slot(capacity)
        slot.fill(originals)
        return slot, None, needed, described
    tensors = [t.detach().contiguous() for t in originals]
    message = torch.empty(capacity, dtype=torch.uint8)
    message[:start].copy_(described.head(False))
    if not data_bytes:
        return message, None, needed, described
    data = torch.empty(data_bytes, dtype=torch.uint8, device=tensors[0].device)
    pack(tensors, data)
    return message, data, needed, described


# structure, specs, inline?, data bytes, bytes needed from the head on, where the last tensor's bytes end
Head = tuple[Any, list, bool, int, int, int]


def decode_head(raw: Any, known: dict[bytes, tuple[Any, list, int, int]] | None = None, offset: int = 0,
                end: int | None = None) -> Head:
    """(structure, specs, inline?, data bytes, bytes the value needs from the head on, where the
    last non-empty tensor's bytes end in the data) of the message head at ``offset`` of ``raw``
    (bytes, bytearray, memoryview or a numpy array), which holds the head up to ``end`` (default:
    its length). ``known`` caches decoded metadata by its bytes. :class:`MessageError` for
    anything but a head this codec wrote."""
    if end is None:
        end = len(raw)
    if end - offset < PREFIX.size:
        raise MessageError(f"a message of {end - offset} bytes is shorter than its {PREFIX.size}-byte prefix")
    magic, length, inline, reserved, data_bytes = PREFIX.unpack_from(raw, offset)
    if magic != MAGIC or inline > 1 or reserved:
        raise MessageError(f"not a conveyor message (it starts with {bytes(raw[offset:offset + 8])!r})")
    body = offset + PREFIX.size
    if length > end - body:
        raise MessageError(f"a message head announces {length} metadata bytes but only {end - body} follow")
    meta = bytes(raw[body:body + length])
    decoded = known.get(meta) if known is not None else None
    if decoded is None:
        structure, specs = decode_metadata(meta)
        padded = last_end = 0
        for shape, dtype, _ in specs:
            size = nbytes(shape, dtype)
            if size:
                last_end = padded + size
            padded += pad(size)
        decoded = structure, specs, padded, last_end
        if known is not None:
            if len(known) > 64:
                known.clear()
            known[meta] = decoded
    if decoded[2] != data_bytes:
        raise MessageError(f"a message head announces {data_bytes} data bytes, its tensors need {decoded[2]}")
    start = pad(PREFIX.size + length)
    return decoded[0], decoded[1], bool(inline), data_bytes, start + data_bytes, decoded[3]


def unpack(structure: Any, specs: list, data: torch.Tensor | None, device: torch.device) -> Any:
    """The value whose tensors lie in ``data`` (a byte tensor; None if it has no data bytes),
    on ``device``; tensors view ``data`` where it is already there."""
    tensors, offset = [], 0
    for shape, dtype, requires_grad in specs:
        size = nbytes(shape, dtype)
        if size == 0 or data is None:
            tensor = torch.empty(shape, dtype=dtype, device=device)
        else:
            tensor = data[offset:offset + size].view(dtype).view(shape)
            if tensor.device != device:
                tensor = tensor.to(device)
        offset += pad(size)
        if requires_grad and (tensor.is_floating_point() or tensor.is_complex()):
            tensor.requires_grad_(True)
        tensors.append(tensor)
    return unflatten(structure, tensors)
