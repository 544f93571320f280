"""The socket transport's set-up trusts only the job's own ranks: a stranger (wrong secret, wrong
rank, or silent) is refused and the real peer still gets through; a peer that never comes ends
the set-up within the timeout, naming the missing rank."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

import conveyor
from conveyor.errors import PeerLostError
from conveyor.runtime.socket_mesh import _connect, join_mesh

SECRET = os.urandom(32)


def _listener() -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    return listener


class _Rank(threading.Thread):
    """One rank of a mesh joining on a thread; ``result`` is its sockets or the error it raised."""

    def __init__(self, rank: int, ports: list[int], secret: bytes, listener: socket.socket, timeout: float,
                 delay: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.args = rank, ports, secret, listener, timeout
        self.delay = delay
        self.result: Any = None

    def run(self) -> None:
        time.sleep(self.delay)
        try:
            self.result = join_mesh(*self.args)
        except Exception as error:  # noqa: BLE001 - handed to the test
            self.result = error


def _mesh(n: int, timeout: float, delays: list[float] | None = None,
          secrets: list[bytes] | None = None) -> tuple[list[_Rank], list[int]]:
    listeners = [_listener() for _ in range(n)]
    ports = [listener.getsockname()[1] for listener in listeners]
    ranks = [_Rank(r, ports, (secrets or [SECRET] * n)[r], listeners[r], timeout, (delays or [0.0] * n)[r])
             for r in range(n)]
    return ranks, ports


def _finish(ranks: list[_Rank], limit: float) -> list[Any]:
    for rank in ranks:
        rank.join(limit)
        assert not rank.is_alive(), "a rank is still joining the mesh"
    return [rank.result for rank in ranks]


def _close(results: list[Any]) -> None:
    for result in results:
        if isinstance(result, dict):
            for sock in result.values():
                sock.close()


def _stranger(port: int, *, rank: int, secret: bytes) -> str:
    """Connect to ``port`` and answer the challenge as rank ``rank`` with ``secret``; what happened."""
    try:
        _connect(rank, 0, port, secret, time.monotonic() + 5, 5)
    except PeerLostError as error:
        return str(error)
    return "accepted"


def test_three_ranks_connect_to_each_other_with_the_secret() -> None:
    ranks, _ = _mesh(3, timeout=10)
    for rank in ranks:
        rank.start()
    results = _finish(ranks, 15)
    assert [sorted(result) for result in results] == [[1, 2], [0, 2], [0, 1]]
    results[0][1].sendall(b"ping")  # the pair's two ends are one connection
    assert results[1][0].recv(4) == b"ping"
    _close(results)


def test_a_stranger_with_a_wrong_secret_connecting_first_is_refused_and_the_job_goes_on() -> None:
    ranks, ports = _mesh(2, timeout=10, delays=[0.0, 0.5])
    ranks[0].start()
    outcome = _stranger(ports[0], rank=1, secret=os.urandom(32))
    ranks[1].start()
    results = _finish(ranks, 15)
    assert "could not prove" in outcome or "closed" in outcome or "failed" in outcome
    assert sorted(results[0]) == [1] and sorted(results[1]) == [0]
    _close(results)


def test_a_silent_stranger_does_not_hold_up_the_real_peer() -> None:
    ranks, ports = _mesh(2, timeout=10, delays=[0.0, 0.3])
    silent = socket.create_connection(("127.0.0.1", ports[0]))  # connects, never answers
    ranks[0].start()
    ranks[1].start()
    started = time.monotonic()
    results = _finish(ranks, 15)
    assert time.monotonic() - started < 5
    assert sorted(results[0]) == [1] and sorted(results[1]) == [0]
    _close(results)
    silent.close()


def test_a_peer_announcing_a_rank_that_does_not_connect_here_is_refused() -> None:
    ranks, ports = _mesh(2, timeout=1.5)
    ranks[0].start()
    outcome = _stranger(ports[0], rank=5, secret=SECRET)  # knows the secret, claims a rank out of range
    error = _finish(ranks[:1], 10)[0]
    assert outcome != "accepted"
    assert isinstance(error, PeerLostError)
    assert "rank(s) 1 never connected" in str(error) and "announced rank 5" in str(error)


def test_a_second_connection_announcing_a_connected_rank_is_refused() -> None:
    ranks, ports = _mesh(3, timeout=10, delays=[0.0, 0.0, 0.8])
    ranks[0].start()
    ranks[1].start()
    time.sleep(0.4)  # rank 1 is connected to rank 0
    outcome = _stranger(ports[0], rank=1, secret=SECRET)
    ranks[2].start()
    results = _finish(ranks, 15)
    assert outcome != "accepted"
    assert [sorted(result) for result in results] == [[1, 2], [0, 2], [0, 1]]
    _close(results)


def test_set_up_with_a_peer_that_never_connects_ends_within_the_timeout_naming_it() -> None:
    ranks, _ = _mesh(3, timeout=1.0)
    ranks[0].start()
    ranks[1].start()  # rank 2 never comes
    started = time.monotonic()
    errors = _finish(ranks[:2], 10)
    assert time.monotonic() - started < 4
    for error in errors:
        assert isinstance(error, PeerLostError)
        assert "rank(s) 2 never connected" in str(error)


def test_a_lower_rank_that_never_answers_ends_the_set_up_within_the_timeout() -> None:
    mute = _listener()  # accepts (the kernel does) but never sends its challenge
    listener = _listener()
    started = time.monotonic()
    with pytest.raises(PeerLostError, match="socket set-up with rank 0 failed: it did not complete the handshake"):
        join_mesh(1, [mute.getsockname()[1], listener.getsockname()[1]], SECRET, listener, 1.0)
    assert time.monotonic() - started < 4
    mute.close()


def test_the_handshake_never_sends_the_secret() -> None:
    seen = bytearray()
    listener = _listener()
    port = listener.getsockname()[1]

    def eavesdrop() -> None:  # a fake rank 0: sends a challenge, records the answer
        conn, _ = listener.accept()
        conn.sendall(struct.pack("<4sI16s", b"CVYC", 0, b"n" * 16))
        conn.settimeout(5)
        seen.extend(conn.recv(1024))
        conn.close()

    thread = threading.Thread(target=eavesdrop, daemon=True)
    thread.start()
    with pytest.raises(PeerLostError):
        _connect(1, 0, port, SECRET, time.monotonic() + 5, 5)
    thread.join(5)
    assert seen and SECRET not in bytes(seen)
    listener.close()


# --- in a launched job ---------------------------------------------------------------------------
def stranger_first(rank: int, world_size: int) -> float:
    """Rank 0's listener gets a connection with a wrong secret before rank 1's; the transport is
    built and a value crosses it."""
    from conveyor.runtime import socket_mesh
    from conveyor.runtime.devices import make_transport
    from conveyor.schedule.links import ACTIVATION, Message

    real_join = socket_mesh.join_mesh

    def join_after_a_stranger(me: int, ports: list[int], secret: bytes, listener: socket.socket,
                              timeout: float) -> dict:
        if me == 0:
            threading.Thread(target=_stranger, args=(ports[0],), kwargs={"rank": 1, "secret": b"x" * 32},
                             daemon=True).start()
        else:
            time.sleep(0.5)
        return real_join(me, ports, secret, listener, timeout)

    socket_mesh.join_mesh = join_after_a_stranger
    transport = make_transport("sockets", None, torch.device("cpu"), timeout=20)
    message = Message(ACTIVATION, 0, 0)
    if rank == 0:
        transport.expect({})
        transport.send(1, message, torch.tensor([42.0]))
        transport.finish()
        value = 42.0
    else:
        transport.expect({0: [message]})
        value = float(transport.receive(message, 0)[0])
        transport.finish()
    dist.barrier()
    transport.close()
    return value


def test_a_job_whose_first_connection_is_a_stranger_completes() -> None:
    assert conveyor.launch(stranger_first, 2, timeout=60) == [42.0, 42.0]
