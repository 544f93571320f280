"""The point-to-point transports on their own: values of any size arrive intact and in order
(over gloo while two receives stay posted ahead; over sockets with data beyond the inline limit
going through gloo), with message buffers reused."""

from __future__ import annotations

import pytest
import torch

import conveyor
from conveyor.runtime.sockets import INLINE_LIMIT

import workers

# floats per value, under and over the 4 KiB starting capacity, growing and shrinking mid-step;
# the link's keys go A A B B A A ...: a big value followed by a small one of the same key catches
# ends that disagree on a message's capacity while the next receive is already posted
SIZES = [[300_000, 4, 8, 250_000, 600_000, 1, 2], [600_000, 3, 3, 700_000, 5, 5, 900_000, 7]]
assert max(max(sizes) for sizes in SIZES) * 4 > INLINE_LIMIT  # sockets: some data goes through gloo


def _expected(step: int, index: int, size: int) -> object:
    value = torch.arange(size, dtype=torch.float32) + 1000 * step + index
    return (value, {"mask": value > 3}) if index % 3 == 0 else value


@pytest.mark.parametrize("kind", ["direct", "sockets"])
@pytest.mark.parametrize("late", ["sender", "receiver"])
def test_values_of_changing_size_arrive_intact_and_in_order(late: str, kind: str) -> None:
    per_rank = conveyor.launch(workers.transport_sequence, 2, args=(SIZES, late, kind), timeout=120)
    received = per_rank[1]
    assert len(received) == len(SIZES)
    for step, sizes in enumerate(SIZES):
        for index, size in enumerate(sizes):
            got, want = received[step][index], _expected(step, index, size)
            if isinstance(want, tuple):
                assert torch.equal(got[0], want[0]) and torch.equal(got[1]["mask"], want[1]["mask"])
            else:
                assert torch.equal(got, want), f"step {step}, message {index} ({size} floats)"


def test_a_sender_never_blocks_on_a_receiver_that_reads_late() -> None:
    # 100 values of 800 KB: more than loopback's socket buffers hold, so most sends are queued
    # and written at later transport calls (here: finish), while the receiver is not yet reading
    count, floats = 100, 200_000
    assert floats * 4 < INLINE_LIMIT
    sender, receiver = conveyor.launch(workers.socket_backlog, 2, args=(count, floats), timeout=120)
    assert sender["transport"] == "SocketTransport"
    assert sender["queued"] > 0
    assert receiver["intact"]


def _layouts() -> list:
    generator = torch.Generator().manual_seed(0)
    wide = torch.randn(6, 40_000, generator=generator)  # 960 KB: more than a socket read takes at once
    return [
        torch.randn(3, generator=generator),  # 12 bytes: padded in a multi-tensor layout
        (torch.randn(4, 5, generator=generator).t(), torch.arange(7), torch.zeros(0, 3)),  # not contiguous, int, empty
        {"ids": torch.tensor([[1, 2], [3, 4]]), "mask": torch.tensor([True, False, True]), "scale": 0.5, "tag": None},
        wide,
        (torch.randn(6, 4000, generator=generator)[:, :1000], torch.randn(2, generator=generator)),  # strided
        torch.zeros(0),
    ]


def _same(got: object, want: object) -> bool:
    if isinstance(want, torch.Tensor):
        return isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want)
    if isinstance(want, (tuple, list)):
        return type(got) is type(want) and len(got) == len(want) and all(map(_same, got, want))
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(_same(got[k], want[k]) for k in want)
    return got == want


@pytest.mark.parametrize("kind", ["direct", "sockets"])
def test_values_of_every_layout_arrive_intact(kind: str) -> None:
    # strided, integer, bool, empty and odd-sized tensors, constants, and data larger than one read
    received = conveyor.launch(workers.transport_values, 2, args=(_layouts(), kind), timeout=120)[1]
    expected = _layouts()
    assert len(received) == len(expected)
    for index, (got, want) in enumerate(zip(received, expected)):
        assert _same(got, want), f"value {index} arrived changed"


def build_and_close(rank: int, world_size: int, count: int, kind: str) -> dict:
    """Build ``count`` transports of ``kind``, one message through each, and close them; this
    process's open file descriptors and threads before and after."""
    import os
    import threading

    from conveyor.runtime.devices import make_transport
    from conveyor.schedule.links import ACTIVATION, Message

    def census() -> tuple[int, int]:
        return len(os.listdir("/proc/self/fd")), threading.active_count()

    kept = []  # held, so nothing is released by garbage collection: only close() may free them

    def one() -> str:
        transport = make_transport(kind, None, torch.device("cpu"), timeout=30)
        message = Message(ACTIVATION, 0, 0)
        transport.expect({0: [message]} if rank == 1 else {})
        if rank == 0:
            transport.send(1, message, torch.ones(3))
        else:
            assert torch.equal(transport.receive(message, 0), torch.ones(3))
        transport.finish()
        transport.close()
        transport.close()  # closing twice is harmless
        kept.append(transport)
        return type(transport).__name__

    one()  # the process group's own connections open on first use, and stay
    before = census()
    names = {one() for _ in range(count)}
    return {"before": before, "after": census(), "names": names}


@pytest.mark.parametrize(("kind", "name"), [("sockets", "SocketTransport"), ("direct", "DirectTransport")])
def test_closing_transports_releases_their_sockets_and_threads(kind: str, name: str) -> None:
    for result in conveyor.launch(build_and_close, 2, args=(100, kind), timeout=120):
        assert result["names"] == {name}
        assert result["after"] == result["before"], "(file descriptors, threads) grew"


def silent_peer(rank: int, world_size: int, kind: str, timeout: float) -> dict:
    """Rank 1 waits for a message rank 0 never sends (rank 0 stays alive meanwhile)."""
    import time

    from conveyor.runtime.devices import make_transport
    from conveyor.schedule.links import ACTIVATION, Message

    transport = make_transport(kind, None, torch.device("cpu"), timeout=timeout)
    if rank == 0:
        time.sleep(timeout + 4)
        transport.close()
        return {}
    message = Message(ACTIVATION, 0, 0)
    transport.expect({0: [message]})
    started = time.monotonic()
    try:
        transport.receive(message, 0)
    except conveyor.PeerLostError as error:
        return {"error": str(error), "seconds": time.monotonic() - started}
    finally:
        transport.close()
    return {"error": None}


@pytest.mark.parametrize("kind", ["direct", "sockets"])
def test_a_receive_from_a_silent_peer_ends_at_the_transports_timeout(kind: str) -> None:
    result = conveyor.launch(silent_peer, 2, args=(kind, 1.5), timeout=60)[1]
    assert result["error"] is not None and "from rank 0 failed" in result["error"]
    assert 1.0 < result["seconds"] < 4.5
