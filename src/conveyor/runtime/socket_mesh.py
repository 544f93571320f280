"""Set-up of the socket transport: one authenticated loopback connection per pair of ranks.

Every rank opens a listener; ports, a host identity and rank 0's random per-job secret travel
by one ``all_gather`` of raw bytes over the group (nothing is pickled). Each rank connects to
every lower rank and accepts every higher one, each pair proving the secret by challenge-response
(HMAC-SHA256 over fresh nonces and both ranks; the secret itself never travels)::

    accepting rank a                      connecting rank b
        <------------- connect ---------------
        --- "CVYC", a, nonce_a -------------->
        <-- "CVYR", b, nonce_b, HMAC(secret, "connect" | nonce_a | b | a)
        --- "CVYP", HMAC(secret, "accept" | nonce_b | a | b) -->

A connection that fails authentication, announces a rank that is out of range, already
connected or not one that connects here, or stays silent, is closed while the rank keeps
waiting for the real peer (several pending connections are served at once, so a silent one
holds nothing up); at the deadline the error names the missing ranks and what was refused.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import selectors
import socket
import struct
import time

import torch
import torch.distributed as dist

from ..errors import PeerLostError

__all__ = ["connect_peers", "join_mesh"]

_CHALLENGE = struct.Struct("<4sI16s")  # b"CVYC", the accepting rank, its nonce
_RESPONSE = struct.Struct("<4sI16s32s")  # b"CVYR", the connecting rank, its nonce, its proof
_PROOF = struct.Struct("<4s32s")  # b"CVYP", the accepting rank's proof
_EXCHANGE = 8 + 32 + 32  # per rank: listening port, host identity, secret (rank 0's is used)
_MAX_PENDING = 64  # unauthenticated connections held at once; older ones are dropped


def _proof(secret: bytes, role: bytes, nonce: bytes, prover: int, verifier: int) -> bytes:
    return hmac.new(secret, role + nonce + struct.pack("<II", prover, verifier), hashlib.sha256).digest()


def connect_peers(group: dist.ProcessGroup | None, *, timeout: float = 300.0) -> dict[int, socket.socket] | None:
    """One connected, authenticated loopback socket per other rank of ``group`` (group ranks),
    or None on every rank when the ranks do not all run on this host. Collective over ``group``;
    every step of the set-up is bounded by ``timeout`` seconds."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(max(16, 2 * size))
        mine = torch.zeros(_EXCHANGE, dtype=torch.uint8)
        mine[:8] = torch.frombuffer(bytearray(struct.pack("<q", listener.getsockname()[1])), dtype=torch.uint8)
        mine[8:40] = torch.frombuffer(bytearray(hashlib.sha256(repr(_this_host()).encode()).digest()),
                                      dtype=torch.uint8)
        if rank == 0:
            mine[40:] = torch.frombuffer(bytearray(os.urandom(32)), dtype=torch.uint8)
        everyone = [torch.empty_like(mine) for _ in range(size)]
        dist.all_gather(everyone, mine, group=group)
        table = [bytes(t.numpy()) for t in everyone]
        if len({row[8:40] for row in table}) != 1:
            listener.close()
            return None
        ports = [struct.unpack("<q", row[:8])[0] for row in table]
        return join_mesh(rank, ports, table[0][40:], listener, timeout)
    finally:
        listener.close()


def join_mesh(rank: int, ports: list[int], secret: bytes, listener: socket.socket,
              timeout: float) -> dict[int, socket.socket]:
    """Connect to every lower rank (at ``ports[r]`` on loopback) and accept every higher one on
    ``listener``, authenticating each by ``secret``; ``{peer rank: socket}``. Raises
    :class:`~conveyor.errors.PeerLostError` naming the missing ranks if the mesh is not complete
    within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    sockets: dict[int, socket.socket] = {}
    try:
        for lower in range(rank):
            sockets[lower] = _connect(rank, lower, ports[lower], secret, deadline, timeout)
        sockets.update(_accept(rank, len(ports), listener, secret, deadline, timeout))
    except BaseException:
        for sock in sockets.values():
            sock.close()
        raise
    for sock in sockets.values():
        sock.setblocking(True)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sockets


def _connect(rank: int, peer: int, port: int, secret: bytes, deadline: float, timeout: float) -> socket.socket:
    """A socket to the lower rank ``peer``, both sides proven to hold ``secret``."""
    def failed(why: str) -> PeerLostError:
        return PeerLostError(f"socket set-up with rank {peer} failed: {why}", rank=rank)

    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise failed(f"no time left of the {timeout:g} s limit")
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=remaining)
    except OSError as error:
        raise failed(f"connecting to its port {port} failed: {error}") from None
    try:
        magic, accepting, nonce = _CHALLENGE.unpack(_receive_exactly(sock, _CHALLENGE.size, deadline))
        if magic != b"CVYC" or accepting != peer:
            raise failed(f"the process at port {port} is not rank {peer} of this job")
        mine = os.urandom(16)
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.sendall(_RESPONSE.pack(b"CVYR", rank, mine, _proof(secret, b"connect", nonce, rank, peer)))
        magic, proof = _PROOF.unpack(_receive_exactly(sock, _PROOF.size, deadline))
        if magic != b"CVYP" or not hmac.compare_digest(proof, _proof(secret, b"accept", mine, peer, rank)):
            raise failed(f"the process at port {port} could not prove it belongs to this job")
    except TimeoutError:
        sock.close()
        raise failed(f"it did not complete the handshake within {timeout:g} s") from None
    except OSError as error:
        sock.close()
        raise failed(f"the handshake failed: {error}") from None
    except BaseException:
        sock.close()
        raise
    return sock


def _receive_exactly(sock: socket.socket, size: int, deadline: float) -> bytes:
    raw = bytearray()
    while len(raw) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        chunk = sock.recv(size - len(raw))
        if not chunk:
            raise ConnectionError("the connection was closed during the handshake")
        raw += chunk
    return bytes(raw)


def _accept(rank: int, size: int, listener: socket.socket, secret: bytes, deadline: float,
            timeout: float) -> dict[int, socket.socket]:
    """A socket from every higher rank, each proven to hold ``secret``; connections that fail
    are closed and the wait goes on until ``deadline``."""
    expected = set(range(rank + 1, size))
    accepted: dict[int, socket.socket] = {}
    pending: dict[socket.socket, tuple[bytes, bytearray]] = {}  # challenged, not yet answered
    refused: list[str] = []
    selector = selectors.DefaultSelector()
    listener.setblocking(False)
    selector.register(listener, selectors.EVENT_READ)

    def refuse(conn: socket.socket, why: str) -> None:
        refused.append(why)
        pending.pop(conn, None)
        selector.unregister(conn)
        conn.close()

    try:
        while expected:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = ", ".join(str(r) for r in sorted(expected))
                detail = f"; refused {len(refused)} connection(s): {'; '.join(refused[-3:])}" if refused else ""
                raise PeerLostError(f"socket set-up timed out after {timeout:g} s: rank(s) {missing} never "
                                    f"connected and authenticated{detail}", rank=rank)
            for key, _ in selector.select(min(remaining, 1.0)):
                conn = key.fileobj
                if conn is listener:
                    try:
                        conn, _ = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    if len(pending) >= _MAX_PENDING:
                        refuse(next(iter(pending)), "a connection stayed silent while others waited")
                    nonce = os.urandom(16)
                    conn.setblocking(False)
                    try:
                        conn.send(_CHALLENGE.pack(b"CVYC", rank, nonce))
                    except OSError:
                        conn.close()
                        continue
                    pending[conn] = (nonce, bytearray())
                    selector.register(conn, selectors.EVENT_READ)
                    continue
                assert isinstance(conn, socket.socket)
                nonce, got = pending[conn]
                try:
                    chunk = conn.recv(_RESPONSE.size - len(got))
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as error:
                    refuse(conn, f"a connection failed: {error}")
                    continue
                if not chunk:
                    refuse(conn, "a connection closed before completing the handshake")
                    continue
                got += chunk
                if len(got) < _RESPONSE.size:
                    continue
                magic, claimed, theirs, proof = _RESPONSE.unpack(bytes(got))
                if magic != b"CVYR":
                    refuse(conn, "a connection spoke another protocol")
                elif not hmac.compare_digest(proof, _proof(secret, b"connect", nonce, claimed, rank)):
                    refuse(conn, f"a connection announcing rank {claimed} failed authentication (wrong secret)")
                elif claimed in accepted:
                    refuse(conn, f"a connection announced rank {claimed}, which is already connected")
                elif claimed not in expected:
                    refuse(conn, f"a connection announced rank {claimed}, but only ranks {rank + 1}..{size - 1} "
                           "connect to this rank")
                else:
                    try:
                        conn.setblocking(True)
                        conn.settimeout(max(0.001, deadline - time.monotonic()))
                        conn.sendall(_PROOF.pack(b"CVYP", _proof(secret, b"accept", theirs, rank, claimed)))
                    except OSError as error:
                        refuse(conn, f"rank {claimed}'s connection failed: {error}")
                        continue
                    pending.pop(conn)
                    selector.unregister(conn)
                    accepted[claimed] = conn
                    expected.discard(claimed)
    except BaseException:
        for conn in accepted.values():
            conn.close()
        raise
    finally:
        for conn in pending:
            conn.close()
        selector.close()
    return accepted


def _this_host() -> tuple[str, str]:
    """This machine: its name and its boot id (two machines may share a name, not a boot id)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as file:
            boot = file.read().strip()
    except OSError:
        boot = ""
    return socket.gethostname(), boot
