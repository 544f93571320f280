"""The message codec on its own, no processes: every value layout survives encoding, messages
frame correctly on a socket however the bytes are cut, oversize values travel apart from their
head, and bytes the codec did not write are refused with a MessageError (never unpickled, never
a crash)."""

from __future__ import annotations

import math
import pickle
import random
import socket
import struct
import threading
import time
from collections import namedtuple
from typing import Any

import pytest
import torch

from conveyor.errors import PeerLostError
from conveyor.runtime.codec import (
    PREFIX,
    MessageError,
    Slot,
    decode_head,
    decode_metadata,
    describe,
    encode,
    encode_metadata,
    unpack,
)
from conveyor.schedule.links import ACTIVATION, Message

Pair = namedtuple("Pair", ["hidden", "mask"])


def _layouts() -> list[Any]:
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(3, generator=generator),  # odd-sized (12 bytes)
        torch.randn(4, 5, generator=generator).t(),  # not contiguous
        torch.randn(6, 4000, generator=generator)[:, :1000],  # strided rows
        torch.arange(7),  # int64
        torch.tensor([True, False, True]),  # bool
        torch.zeros(0, 3),  # empty
        torch.tensor(2.5, dtype=torch.float64),  # 0-d
        torch.randn(2, 3, generator=generator).to(torch.bfloat16),
        (torch.arange(5, dtype=torch.int32), torch.zeros(0), torch.ones(1, dtype=torch.uint8)),
        {"ids": torch.tensor([[1, 2], [3, 4]]), "mask": torch.tensor([True, False]), "scale": 0.5, "tag": None},
        [1, -7, 2**70, -(2**65), 3.25, float("inf"), "naïve ✓", True, False, None],  # constants only
        {"outer": [(torch.randn(2, generator=generator), {"deep": [torch.arange(3), "x"]}), None], 7: "seven"},
        Pair(torch.randn(2, 2, generator=generator), torch.tensor([True, False])),
        torch.randn(300_000, generator=generator),  # large: 1.2 MB
    ]


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, torch.Tensor):
        return (isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.shape == want.shape
                and torch.equal(got, want))
    if isinstance(want, (tuple, list)):
        return type(got) is type(want) and len(got) == len(want) and all(map(_same, got, want))
    if isinstance(want, dict):
        return isinstance(got, dict) and list(got) == list(want) and all(_same(got[k], want[k]) for k in want)
    if isinstance(want, float) and math.isnan(want):
        return isinstance(got, float) and math.isnan(got)
    return type(got) is type(want) and got == want


def _round_trip(value: Any, capacity: int) -> tuple[Any, bool]:
    """``value`` encoded into a message of ``capacity`` bytes and decoded; whether it was inline."""
    encoded, data, _, _ = encode(value, "test value", capacity)
    message = encoded.message if isinstance(encoded, Slot) else encoded
    structure, specs, inline, data_bytes, needed, _ = decode_head(message.numpy())
    if inline:
        data = message[needed - data_bytes:needed]
    return unpack(structure, specs, data, torch.device("cpu")), inline


@pytest.mark.parametrize("index", range(len(_layouts())))
def test_every_layout_survives_encoding_inline(index: int) -> None:
    value = _layouts()[index]
    got, inline = _round_trip(value, 4 << 20)
    assert inline
    assert _same(got, value)


@pytest.mark.parametrize("index", range(len(_layouts())))
def test_every_layout_survives_encoding_with_its_data_apart_when_it_outgrows_the_message(index: int) -> None:
    value = _layouts()[index]
    described, _ = describe(value, "test value")
    got, inline = _round_trip(value, described.start)  # room for the head only
    assert inline == (described.data_bytes == 0)
    assert _same(got, value)


def test_the_requires_grad_flag_travels_with_floating_tensors() -> None:
    value = (torch.randn(2, requires_grad=True), torch.randn(2), torch.arange(2))
    got, _ = _round_trip(value, 4096)
    assert [t.requires_grad for t in got] == [True, False, False]


def test_a_named_tuple_comes_back_as_its_own_class() -> None:
    got, _ = _round_trip(Pair(torch.zeros(1), torch.ones(1)), 4096)
    assert type(got) is Pair


def test_a_named_tuple_of_a_module_not_imported_here_comes_back_with_its_name_and_fields() -> None:
    ghost = namedtuple("Ghost", ["first", "second"])
    ghost.__module__ = "a_module_nobody_imported"  # decoding must not import it
    structure, _ = decode_metadata(encode_metadata(ghost(1, "two"), []))
    assert type(structure).__name__ == "Ghost" and structure.first == 1 and structure.second == "two"
    assert type(structure) is not ghost


def test_metadata_round_trips_exactly() -> None:
    value = {"a": [torch.zeros(2, 3), (1, 2.5, "s", None)], 3: torch.ones(4, dtype=torch.int16)}
    described, _ = describe(value, "test value")
    structure, specs = decode_metadata(described.meta)
    assert structure == described.structure
    assert specs == described.specs


def test_a_value_described_the_same_way_reuses_its_description_and_head() -> None:
    first, _ = describe(torch.randn(4, 8), "test value")
    again, tensors = describe(torch.randn(4, 8), "test value", first)
    assert again is first and len(tensors) == 1
    nested, _ = describe((torch.randn(2), {"k": 1}), "test value")
    assert describe((torch.randn(2), {"k": 1}), "test value", nested)[0] is nested
    assert describe((torch.randn(3), {"k": 1}), "test value", nested)[0] is not nested


def test_decoded_metadata_is_cached_by_its_bytes() -> None:
    message = _message({"a": torch.zeros(2), "b": [1, "x"]})
    known: dict = {}
    first = decode_head(message, known)
    second = decode_head(message, known)
    assert len(known) == 1 and first[0] is second[0] and first[1] is second[1]


def test_a_dict_key_the_codec_cannot_write_is_refused_when_sent() -> None:
    with pytest.raises(TypeError, match="dict key of type tuple"):
        describe({(1, 2): torch.zeros(1)}, "test value")


# --- bytes the codec did not write -----------------------------------------------------------
def _message(value: Any) -> bytes:
    """The head of ``value``'s message."""
    return describe(value, "test value")[0].head_bytes(True)


def _expect_refusal(raw: bytes) -> None:
    """Decoding ``raw`` either refuses it with a MessageError or yields a well-formed head."""
    try:
        structure, specs, _, _, _, _ = decode_head(raw)
    except MessageError:
        return
    assert isinstance(specs, list)


def test_foreign_bytes_are_refused() -> None:
    with pytest.raises(MessageError, match="not a conveyor message"):
        decode_head(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")


def test_every_truncation_of_a_head_is_refused() -> None:
    raw = _message({"a": [torch.zeros(2, 3), (1, 2.5, "text")], "b": torch.arange(4)})
    for length in range(len(raw.rstrip(b"\0"))):
        with pytest.raises(MessageError):
            decode_head(raw[:length])


def test_any_single_corrupted_byte_is_refused_or_decodes_cleanly() -> None:
    raw = bytearray(_message({"a": [torch.zeros(2, 3), (1, 2.5, "text")], "b": torch.arange(4)}))
    for index in range(len(raw)):
        for flip in (0x01, 0x80, 0xFF):
            corrupted = bytearray(raw)
            corrupted[index] ^= flip
            _expect_refusal(bytes(corrupted))


def test_random_bytes_after_a_valid_prefix_never_crash_the_decoder() -> None:
    generator = random.Random(0)
    for _ in range(2000):
        meta = bytes(generator.randrange(256) for _ in range(generator.randrange(1, 40)))
        meta = generator.choice([b"t", b"l", b"d", b"L", b"n", b"s", b"i"]) + meta
        _expect_refusal(PREFIX.pack(b"CVM1", len(meta), 1, 0, 0) + meta)


class _Bomb:
    exploded = False

    def __reduce__(self) -> tuple:
        return _explode, ()


def _explode() -> None:
    _Bomb.exploded = True


def test_pickled_metadata_is_refused_and_never_unpickled() -> None:
    meta = pickle.dumps((_Bomb(), []))
    with pytest.raises(MessageError):
        decode_head(PREFIX.pack(b"CVM1", len(meta), 1, 0, 0) + meta)
    assert not _Bomb.exploded


def test_a_huge_announced_count_is_refused_without_allocating() -> None:
    meta = b"l" + struct.pack("<I", 2**32 - 1)
    with pytest.raises(MessageError, match="announces 4294967295 items"):
        decode_head(PREFIX.pack(b"CVM1", len(meta), 1, 0, 0) + meta)


def test_deep_nesting_is_refused_not_a_recursion_error() -> None:
    meta = (b"t" + struct.pack("<I", 1)) * 10_000 + b"N" + struct.pack("<I", 0)
    with pytest.raises(MessageError, match="deeper"):
        decode_head(PREFIX.pack(b"CVM1", len(meta), 1, 0, 0) + meta)


def test_a_head_whose_data_size_disagrees_with_its_tensors_is_refused() -> None:
    raw = bytearray(_message(torch.zeros(4)))
    struct.pack_into("<Q", raw, 16, 1 << 40)
    with pytest.raises(MessageError, match="data bytes"):
        decode_head(bytes(raw))


def test_tensor_places_that_do_not_match_the_tensor_records_are_refused() -> None:
    meta = b"L" + struct.pack("<I", 5) + struct.pack("<I", 1) + struct.pack("<BBB", 0, 0, 1) + struct.pack("<q", 2)
    with pytest.raises(MessageError, match="tensor places"):
        decode_metadata(meta)


# --- framing on a socket -----------------------------------------------------------------------
@pytest.fixture
def socket_pair(one_rank_group: None) -> Any:
    """A sending and a receiving socket transport joined by a socket pair (each sees the other as
    its peer: rank 1 from the sender, rank 0 from the receiver)."""
    from conveyor.runtime.sockets import SocketTransport

    ours, theirs = socket.socketpair()
    sender = SocketTransport(None, torch.device("cpu"), {1: ours}, timeout=5.0)
    receiver = SocketTransport(None, torch.device("cpu"), {0: theirs}, timeout=5.0)
    yield sender, receiver
    sender.close()
    receiver.close()


def _values() -> list[Any]:
    """Every layout, the large one cut to what travels inline on a socket: 960 KB, more than the
    64 KiB inbox, so it is read straight into its own buffer."""
    return _layouts()[:-1] + [torch.randn(6, 40_000, generator=torch.Generator().manual_seed(1))]


def test_messages_arrive_intact_and_in_order_over_a_socket(socket_pair: Any) -> None:
    sender, receiver = socket_pair
    values = _values()
    messages = [Message(ACTIVATION, 0, i) for i in range(len(values))]
    receiver.expect({0: messages})
    sender.expect({})
    for message, value in zip(messages, values):
        sender.send(1, message, value)
        writing = threading.Thread(target=sender.finish)  # what the socket did not take at once
        writing.start()
        assert _same(receiver.receive(message, 0), value)
        writing.join()


def _wire_bytes(values: list[Any], one_rank_group: None) -> bytes:
    """The bytes a socket transport writes for ``values``."""
    from conveyor.runtime.sockets import SocketTransport

    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    sender = SocketTransport(None, torch.device("cpu"), {1: ours}, timeout=5.0)
    sender.expect({})
    collected = bytearray()
    for index, value in enumerate(values):
        sender.send(1, Message(ACTIVATION, 0, index), value)
        while True:
            sender.flush()
            try:
                chunk = theirs.recv(1 << 20)
            except BlockingIOError:
                if any(peer.outgoing for peer in sender._peers.values()):
                    continue
                break
            collected += chunk
    sender.close()
    theirs.close()
    return bytes(collected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_messages_cut_into_arbitrary_chunks_arrive_intact(one_rank_group: None, seed: int) -> None:
    from conveyor.runtime.sockets import SocketTransport

    values = _values()
    raw = _wire_bytes(values, one_rank_group)
    writer, reading = socket.socketpair()
    receiver = SocketTransport(None, torch.device("cpu"), {0: reading}, timeout=5.0)
    messages = [Message(ACTIVATION, 0, i) for i in range(len(values))]
    receiver.expect({0: messages})
    generator, at, received = random.Random(seed), 0, []
    peer = receiver._peers[0]
    while at < len(raw):
        size = generator.choice([1, 2, 7, 15, 16, 17, 100, 4096, 70_000])
        writer.sendall(raw[at:at + size])
        at += size
        receiver._read(peer)  # take in what the socket holds now, as a receive does
        while peer.complete and len(received) < len(messages):
            received.append(receiver.receive(messages[len(received)], 0))
    assert len(received) == len(values)
    for got, want in zip(received, values):
        assert _same(got, want)
    receiver.close()
    writer.close()


def test_foreign_bytes_on_a_socket_end_the_wait_with_a_clear_error(socket_pair: Any) -> None:
    sender, receiver = socket_pair
    message = Message(ACTIVATION, 0, 0)
    receiver.expect({0: [message]})
    sender._peers[1].sock.sendall(struct.pack("<qq", 40, 0) + b"x" * 40)
    with pytest.raises(PeerLostError, match="not a conveyor message"):
        receiver.receive(message, 0)


def test_a_frame_announcing_more_than_the_inline_limit_is_refused(socket_pair: Any) -> None:
    sender, receiver = socket_pair
    message = Message(ACTIVATION, 0, 0)
    receiver.expect({0: [message]})
    sender._peers[1].sock.sendall(struct.pack("<qq", 48, 1 << 50))
    with pytest.raises(PeerLostError, match="not a conveyor message"):
        receiver.receive(message, 0)


def test_a_receive_from_a_silent_peer_ends_at_the_timeout(one_rank_group: None) -> None:
    from conveyor.runtime.sockets import SocketTransport

    ours, theirs = socket.socketpair()
    receiver = SocketTransport(None, torch.device("cpu"), {0: theirs}, timeout=0.5)
    message = Message(ACTIVATION, 0, 0)
    receiver.expect({0: [message]})
    started = time.monotonic()
    with pytest.raises(PeerLostError, match="nothing arrived in 0.5 s"):
        receiver.receive(message, 0)
    assert time.monotonic() - started < 3
    receiver.close()
    ours.close()


def test_a_value_too_intricate_to_describe_is_refused_by_the_sender(socket_pair: Any) -> None:
    sender, _ = socket_pair
    sender.expect({})
    with pytest.raises(ValueError, match="too many tensors"):
        sender.send(1, Message(ACTIVATION, 0, 0), [torch.zeros(1)] * 5000)
