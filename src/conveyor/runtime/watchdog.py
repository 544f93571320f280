"""The watchdog: every rank of a pipeline knows what every other rank was asked to do.

The main thread only writes plain attributes: the runner its current call (kind, number,
micro-batches; :class:`CallState`), the executor its current action and when its input was
ready, the transport what it waits for while it sits in a receive. Nothing else happens per
step. A daemon thread per runner (:class:`Watchdog`) publishes this rank's record about once a
second in a store (one that outlives every rank: :func:`conveyor.launch`'s, or torchrun's agent
store; else a ``TCPStore`` that the runner's rank 0 serves) and reads the others'. When this
rank's main thread has waited in one receive for ``CHECK_AFTER`` seconds it judges the records
and, if the job cannot go on, leaves
a verdict on the transport: the transport's wait loop raises it (the socket transport wakes each
second; a gloo wait is ended by a deliberate timeout on the same process group). A closed
connection is explained from the records too (:meth:`Watchdog.explain_lost`).

Verdicts (each names every rank concerned):
- the ranks made different calls under the same number (``step()`` against ``forward()``);
- a rank has been computing one action longer than ``stall_timeout`` (waits for a peer do not count);
- a rank left the job (closed its runner, or its process ended) before a call its peers are in;
- a rank has made no call for ``stall_timeout`` while a peer waits for it in the next one;
- every rank waits, in calls that differ.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import multiprocessing.util
import os
import socket
import struct
import threading
import time
import warnings
import weakref
from collections import deque
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import CallMismatchError, PeerLeftError, StallError

__all__ = ["CallState", "Watchdog", "open_store", "STORE_VARIABLE", "CHECK_AFTER", "BEAT_SECONDS",
           "DEFAULT_STALL_TIMEOUT"]

DEFAULT_STALL_TIMEOUT = 60.0
BEAT_SECONDS = 1.0  # how often a rank publishes its record
CHECK_AFTER = 2.0  # a receive that has waited this long has the records judged (every half beat)
SETTLED = 1.0  # a peer's state must be this old before "nobody is working" counts
_POKE_TAG = 0x7C0  # a receive nobody sends: its timeout ends a gloo wait so the verdict can be raised
_HISTORY = 4  # calls kept in a record


class CallState:
    """What the main thread is doing, in plain attributes (written per call, read by the watchdog)."""

    def __init__(self, n_microbatches: int) -> None:
        self.n_microbatches = n_microbatches
        self.number = 0  # calls made so far (the current one included)
        self.kind = ""
        self.active = False
        self.failed = False  # the last call raised: a rank that then ends failed, it did not leave
        self.changed = time.monotonic()
        self.history: deque[tuple[int, str, int]] = deque(maxlen=_HISTORY)

    def begin(self, kind: str) -> None:
        """A call of ``kind`` (``"step"``, ``"forward"``, ``"stream"``, ``"generate"``) starts."""
        self.number += 1
        self.kind = kind
        self.history.append((self.number, kind, self.n_microbatches))
        self.active = True
        self.changed = time.monotonic()

    def end(self, failed: bool = False) -> None:
        """The current call returned (or raised: ``failed``)."""
        self.active = False
        self.failed = failed
        self.changed = time.monotonic()


def _call(entry: list | tuple) -> str:
    number, kind, microbatches = entry
    return f"{kind}() (call {number}, {microbatches} micro-batch{'es' if microbatches != 1 else ''})"


class _Record:
    """A rank's published state, decoded (JSON: nothing read from the store is executed)."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.rank: int = int(raw["rank"])
        self.status: str = str(raw["status"])  # "call", "idle", "left" or "failed" (ended after an error)
        self.history: list[list] = list(raw["history"])
        self.action: str | None = raw.get("action")
        self.stage: int | None = raw.get("stage")
        self.busy: float = float(raw.get("busy", 0.0))  # seconds in the current action, waits excluded
        self.waiting: bool = bool(raw.get("waiting", False))
        self.age: float = float(raw.get("age", 0.0))  # seconds since the call state last changed
        self.stale: float = time.time() - float(raw.get("time", 0.0))  # seconds since it was published

    @property
    def number(self) -> int:
        return int(self.history[-1][0]) if self.history else 0

    def entry(self, number: int) -> list | None:
        return next((entry for entry in self.history if int(entry[0]) == number), None)

    @property
    def working(self) -> bool:
        """In a call and not waiting for a peer (computing, sending, reducing)."""
        return self.status == "call" and not self.waiting


_EXCHANGE = struct.Struct("<q16s32s64s")  # store port (rank 0), job id (rank 0), host identity, host name


STORE_VARIABLE = "CONVEYOR_STORE"  # host:port of a store that outlives every rank (set by conveyor.launch)


def _job_store() -> tuple[str, int] | None:
    """The address of a store that outlives the ranks: conveyor.launch's, or torchrun's agent store."""
    address = os.environ.get(STORE_VARIABLE)
    if address is None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and "MASTER_PORT" in os.environ:
        address = f"{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{os.environ['MASTER_PORT']}"
    if address is None:
        return None
    host, _, port = address.rpartition(":")
    return host, int(port)


def open_store(group: dist.ProcessGroup | None, agreed: dict[str, Any], *,
               timeout: float) -> tuple[dist.Store, Any, int | None]:
    """The watchdog's store for the ranks of ``group``: the job's own store where one outlives
    every rank (:func:`conveyor.launch`'s, torchrun's agent store), else a ``TCPStore`` that
    rank 0 serves; its port and a fresh key prefix every rank learns by one ``all_gather`` of raw
    bytes. ``agreed`` (construction arguments every rank must share) travels along; a rank whose
    values differ is refused here, naming each rank's. Returns (the store, what keeps it open,
    the rank serving it or None)."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    server = None
    job_store = _job_store()
    if rank == 0 and job_store is None:
        server = dist.TCPStore("0.0.0.0", 0, None, True, timedelta(seconds=timeout), wait_for_workers=False)
    host = socket.gethostname()
    digest = hashlib.sha256(json.dumps(agreed, sort_keys=True).encode()).digest()
    mine = _EXCHANGE.pack(server.port if server is not None else 0, os.urandom(16) if rank == 0 else bytes(16),
                          hashlib.sha256(host.encode()).digest(), host.encode()[:64])
    # NCCL gathers only CUDA tensors
    wire = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    row = torch.frombuffer(bytearray(mine + digest), dtype=torch.uint8).to(wire)
    rows = [torch.empty_like(row) for _ in range(size)]
    dist.all_gather(rows, row, group=group)
    table = [bytes(r.cpu().numpy()) for r in rows]
    if len({r[_EXCHANGE.size:] for r in table}) != 1:
        encoded = json.dumps(agreed, sort_keys=True).encode()
        lengths = [torch.zeros(1, dtype=torch.int64, device=wire) for _ in range(size)]
        dist.all_gather(lengths, torch.tensor([len(encoded)], device=wire), group=group)
        longest = int(max(length.item() for length in lengths))
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[:len(encoded)] = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)
        padded = padded.to(wire)
        everyone = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(everyone, padded, group=group)
        seen = [json.loads(bytes(t[:int(n.item())].cpu().numpy())) for t, n in zip(everyone, lengths)]
        differ = [key for key in agreed if len({json.dumps(s.get(key)) for s in seen}) > 1]
        details = "; ".join(f"{key}: " + ", ".join(f"rank {r} {s.get(key)!r}" for r, s in enumerate(seen))
                            for key in differ)
        raise ValueError(f"the ranks built different PipelineRunners ({details}): every rank must construct "
                         "the runner with the same arguments")
    port, job, _, name = _EXCHANGE.unpack(table[0][:_EXCHANGE.size])
    if job_store is not None:
        address, port = job_store
    else:
        address = "127.0.0.1" if len({r[24:56] for r in table}) == 1 else name.rstrip(b"\0").decode()
    client = server if server is not None else dist.TCPStore(address, port, None, False, timedelta(seconds=timeout),
                                                             wait_for_workers=False)
    return dist.PrefixStore(f"conveyor-watchdog/{job.hex()}/", client), (server, client), \
        (None if job_store is not None else 0)


_LIVE: weakref.WeakSet[Watchdog] = weakref.WeakSet()
_EXIT_HOOKED: set[int] = set()


def _leave_all() -> None:
    for watchdog in list(_LIVE):
        watchdog.close()


def _hook_exit() -> None:
    """Publish "left" for every open runner when the process ends (also in a launched rank, whose
    exit skips ``atexit`` but runs multiprocessing's finalizers)."""
    if os.getpid() in _EXIT_HOOKED:
        return
    _EXIT_HOOKED.add(os.getpid())
    atexit.register(_leave_all)
    multiprocessing.util.Finalize(None, _leave_all, exitpriority=100)


class Watchdog:
    """Publishes this rank's record, reads the others', and leaves a verdict on ``transport``
    when the job cannot go on (see the module docstring). ``store`` is shared by the runner's
    ranks (served by rank ``host``, or by the job where None); ``executor`` and ``transport`` are
    this rank's."""

    def __init__(self, store: dist.Store, rank: int, n_ranks: int, calls: CallState, executor: Any,
                 transport: Any, *, stall_timeout: float, first_stage: int, host: int | None = None) -> None:
        self.store, self.rank, self.n_ranks = store, rank, n_ranks
        self.host = host  # the rank that serves the store (None: the job's store outlives the ranks)
        self.calls = calls
        # weak: the thread must not keep a dropped runner (which holds both) alive
        transport = getattr(transport, "wire", transport)  # the host-staged transport waits in its wire
        self._executor, self._transport = weakref.ref(executor), weakref.ref(transport)
        transport.explain = self.explain_lost
        self.stall_timeout = stall_timeout
        self.first_stage = first_stage
        self.records: dict[int, _Record] = {}  # the last records read, by rank
        self.verdict: BaseException | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._seen: Any = None  # the wait seen at the last look, and since when
        self._seen_at = 0.0
        self._published = 0.0
        self._closed = False
        self._store_lost = False  # once the store fails, only what was read is judged (no retries)
        self._publish(self._record())
        self._thread = threading.Thread(target=self._run, name=f"conveyor-watchdog-{rank}", daemon=True)
        self._thread.start()
        _LIVE.add(self)
        _hook_exit()

    @property
    def transport(self) -> Any:
        return self._transport()

    # --- this rank's record ---------------------------------------------------------------------
    def _record(self, status: str | None = None) -> dict[str, Any]:
        calls, executor = self.calls, self._executor()
        now = time.monotonic()
        waiting = getattr(self.transport, "waiting", None) is not None
        current = executor.current if calls.active and executor is not None else None
        record: dict[str, Any] = {
            "rank": self.rank, "history": [list(entry) for entry in list(calls.history)],  # copied in C: atomic
            "status": status or ("call" if calls.active else "idle"), "waiting": waiting,
            "age": now - calls.changed, "action": None, "stage": self.first_stage, "busy": 0.0, "time": time.time()}
        if current is not None:
            record["action"], record["stage"] = current.text, current.action.stage
            if not waiting:
                record["busy"] = max(0.0, time.perf_counter() - executor.ready_at)
        return record

    def _publish(self, record: dict[str, Any]) -> None:
        with self._lock:
            self.store.set(str(self.rank), json.dumps(record))
        self._published = time.monotonic()

    def _read(self) -> dict[int, _Record]:
        records = {}
        with self._lock:
            for rank in range(self.n_ranks):
                if rank != self.rank and self.store.check([str(rank)]):
                    records[rank] = _Record(json.loads(self.store.get(str(rank))))
        self.records.update(records)
        return records

    # --- the thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(BEAT_SECONDS / 2):
            try:
                self._beat()
            except Exception as error:  # noqa: BLE001 - a watchdog must not end the job by its own failure
                warnings.warn(f"conveyor's watchdog on rank {self.rank} stopped judging: {error!r}", stacklevel=1)
                return

    def _beat(self) -> None:
        now = time.monotonic()
        waited = self._waited()
        if not self._store_lost and (now - self._published >= BEAT_SECONDS or waited >= CHECK_AFTER):
            try:
                self._publish(self._record())
                self._read()
            except (RuntimeError, OSError):  # the store went away (its host left): judge from what was read
                self._store_lost = True
        if waited >= CHECK_AFTER and self.verdict is None:
            self._decide(self._judge(self.records, store_lost=self._store_lost))

    def _waited(self) -> float:
        """How long the main thread has been in its current receive (0 if it is not in one)."""
        waiting = getattr(self.transport, "waiting", None)
        now = time.monotonic()
        if waiting is None:
            self._seen = None
            return 0.0
        if waiting is not self._seen:
            self._seen, self._seen_at = waiting, now
        return now - self._seen_at

    def _decide(self, verdict: BaseException | None) -> None:
        if verdict is None:
            return
        self.verdict = verdict
        transport = self.transport
        if transport is None:
            return
        transport.verdict = verdict
        waiting = getattr(transport, "waiting", None)
        if getattr(transport, "wait_limit", None) is not None and waiting is not None:
            source = waiting[0]
            try:  # a gloo wait cannot be woken: a receive that times out ends every wait of the group
                transport.pg.recv([torch.empty(1)], source, _POKE_TAG).wait(timedelta(milliseconds=1))
            except RuntimeError:
                pass

    # --- judging ----------------------------------------------------------------------------------
    def _mine(self) -> _Record:
        return _Record(self._record())

    def _judge(self, records: dict[int, _Record], *, store_lost: bool = False,
               settled: bool = True) -> BaseException | None:
        """The verdict the records support, or None. ``settled=False`` (a closed connection, whose
        peer may have crashed after its last record) keeps to what a record states outright."""
        mine = self._mine()
        everyone = dict(records)
        everyone[self.rank] = mine
        number = mine.number
        my_entry = mine.entry(number)
        if my_entry is None:
            return None
        for record in records.values():  # different calls under one number
            theirs = record.entry(number)
            if theirs is not None and list(theirs) != list(my_entry):
                return self._mismatch(everyone, number)
        for record in records.values():
            if record.working and record.action is not None and record.busy >= self.stall_timeout:
                return StallError(f"rank {record.rank} (stage {record.stage}) has been in action {record.action} for "
                                  f"{record.busy:.0f} s (stall_timeout {self.stall_timeout:g} s); "
                                  f"{self._waiting_here(my_entry)}", rank=self.rank)
        for record in records.values():
            if record.status == "left" and record.number < number:
                return self._left(record, my_entry)
        if store_lost and self.host == 0 and 0 in records and self.rank != 0:
            lost = records[0]
            if lost.number < number or lost.status != "call":
                return self._left(lost, my_entry, note=" (the watchdog's store, served by rank 0, closed)")
        for record in records.values():  # idle before this call for too long
            if record.status == "idle" and record.number < number and record.age >= self.stall_timeout:
                return self._mismatch(everyone, number)
        if not settled or any(record.working or record.stale > 2 * BEAT_SECONDS for record in records.values()):
            return None
        elsewhere = [record for record in records.values() if not (record.status == "idle" and record.number < number)
                     and (record.status != "call" or record.number != number)]
        if elsewhere and all(record.age >= SETTLED for record in elsewhere):
            return self._mismatch(everyone, number)  # nobody works, and some wait in (or finished) other calls
        return None

    def _waiting_here(self, entry: list | tuple) -> str:
        number, kind, microbatches = entry
        plural = "es" if microbatches != 1 else ""
        return f"rank {self.rank} is waiting for it in call {number} ({kind}(), {microbatches} micro-batch{plural})"

    def _left(self, record: _Record, my_entry: list | tuple, note: str = "") -> PeerLeftError:
        after = f"after call {record.number}" if record.number else "before its first call"
        return PeerLeftError(f"rank {record.rank} left the job {after}{note}; {self._waiting_here(my_entry)}",
                             rank=self.rank)

    def _mismatch(self, everyone: dict[int, _Record], number: int) -> CallMismatchError:
        parts = []
        for rank in sorted(everyone):
            record = everyone[rank]
            entry = record.entry(number)
            if entry is not None:
                text = f"rank {rank} called {_call(entry)}"
                if record.number > number:
                    text += f" and is now in {_call(record.history[-1])}"
            elif record.history and record.number > number:
                text = f"rank {rank} is in {_call(record.history[-1])}"
            else:
                last = f"its last: {_call(record.history[-1])}" if record.history else "no call yet"
                text = f"rank {rank} has made no call {number} ({last})"
            if record.status == "left":
                text += ", then left the job"
            elif record.status == "idle" and record.number < number:
                text += f", idle for {record.age:.0f} s"
            parts.append(text)
        return CallMismatchError("the ranks made different calls: " + ", ".join(parts), rank=self.rank)

    def explain_lost(self, source: int) -> BaseException | None:
        """Why the connection to rank ``source`` ended, if the records tell (the main thread calls
        this when a receive finds it closed); waits briefly for the peer's last record."""
        if self.verdict is not None:
            return self.verdict
        deadline = time.monotonic() + 2 * BEAT_SECONDS
        while True:
            store_lost = self._store_lost
            try:
                records = dict(self.records) if store_lost else self._read()
            except (RuntimeError, OSError, AttributeError):  # the store's host is gone (or this rank closed it)
                records, store_lost = dict(self.records), True
            peer = records.get(source)
            verdict = self._judge(records, store_lost=store_lost, settled=False)
            if verdict is not None:
                return verdict
            if peer is not None and peer.status == "failed":
                return None  # its own error is the one to report
            if store_lost or time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

    # --- the end ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the thread and publish that this rank left (its peers name it); idempotent."""
        if self._closed:
            return
        self._closed = True
        _LIVE.discard(self)
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        if not self._store_lost:
            try:
                self._publish(self._record("failed" if self.calls.failed else "left"))
            except (RuntimeError, OSError):  # the store's host already left
                pass
        transport = self.transport
        if transport is not None:
            transport.explain = None
        self.store = None  # type: ignore[assignment]  # its connection closes now, not when the runner is collected
