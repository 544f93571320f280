"""Start a job: local processes on loopback (:func:`launch`) or a ``torchrun`` worker (:func:`run`).

:func:`launch` owns the children: it starts one process per rank, initialises the default
process group in each (gloo on CPU, NCCL when every rank has a GPU of its own), collects their
return values (pickled bytes, so tensors come back whole after the child exits), and when a
rank raises or dies it tears every other rank down and raises :class:`LaunchError` naming it.

No rank outlives the launching process: each rank holds the reading end of a *lifeline* pipe
whose only writer is the launcher, and a watchdog thread in the rank ends the rank as soon as
that pipe reports end-of-file, which the kernel does when the launcher dies, however it dies
(SIGKILL and SIGTERM included). ``PR_SET_PDEATHSIG`` alone is not enough: under the fork
server a rank's parent is the server, not the launcher.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from .errors import LaunchError, PeerLostError

__all__ = ["launch", "run", "default_backend"]

_GRACE_SECONDS = 2.0
LAUNCHER_GONE_EXIT = 75  # a rank's exit status when its launcher died
_SECONDARY_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def default_backend(world_size: int) -> str:
    """NCCL when CUDA is present with a GPU per rank, gloo otherwise."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size:
        return "nccl"
    return "gloo"


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the launching process dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _watch_launcher(rank: int, lifeline: mp_connection.Connection) -> None:
    """End this rank (at once, whatever it is doing) when the launcher's end of ``lifeline`` closes."""
    def watch() -> None:
        try:
            while True:
                lifeline.recv_bytes()  # the launcher never writes: this returns only at EOF (raises)
        except (EOFError, OSError):
            pass
        with contextlib.suppress(OSError):
            os.write(2, f"conveyor: rank {rank}: the launching process is gone; ending this rank\n".encode())
        os._exit(LAUNCHER_GONE_EXIT)
    threading.Thread(target=watch, name="conveyor-launcher-watchdog", daemon=True).start()


def _is_secondary(error: BaseException) -> bool:
    """Errors that only report another rank's failure (a closed connection)."""
    if isinstance(error, PeerLostError):
        return True
    text = str(error)
    return any(marker in text for marker in _SECONDARY_MARKERS)


def _init_process_group(rank: int, world_size: int, backend: str, store: dist.Store,
                        timeout: datetime.timedelta) -> None:
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def _worker(rank: int, world_size: int, port: int, backend: str, threads: int | None,
            pg_timeout: float, fn: Callable[..., Any], args: Sequence[Any],
            connection: mp_connection.Connection, lifeline: mp_connection.Connection,
            lifeline_writer: mp_connection.Connection) -> None:
    lifeline_writer.close()  # the launcher must hold the only writer (a forked child inherits it)
    _watch_launcher(rank, lifeline)
    _die_with_parent()
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ["CONVEYOR_TIMEOUT"] = str(pg_timeout)  # the runners' default timeout (runner.py)
    os.environ["CONVEYOR_STORE"] = f"127.0.0.1:{port}"  # outlives every rank: the runners' watchdog uses it
    if threads is not None:
        torch.set_num_threads(threads)
    message: tuple
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                              timeout=datetime.timedelta(seconds=60))
        _init_process_group(rank, world_size, backend, store, datetime.timedelta(seconds=pg_timeout))
        result = fn(rank, world_size, *args)
        message = ("ok", pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    except BaseException as error:  # noqa: BLE001 - every failure goes back to the parent
        message = ("error", traceback.format_exc(), _is_secondary(error))
    try:
        connection.send(message)
    except Exception:  # noqa: BLE001 - e.g. an unpicklable result
        connection.send(("error", traceback.format_exc(), False))
    finally:
        connection.close()
    if dist.is_initialized():
        if message[0] == "ok":
            dist.destroy_process_group()
        else:
            os._exit(1)  # peers may be gone: do not wait on a collective teardown


def _context() -> mp.context.BaseContext:
    """A fork server (on Linux) that imports torch once, so each launch costs a fork, not an import.

    The server forks from a clean process that has run no torch kernels, which keeps fork safe;
    elsewhere processes are spawned. ``torch._dynamo`` is preloaded too: building any torch
    optimizer imports it, which otherwise costs each child about 2.5 s. ``conveyor._forkserver``
    makes the server exit at once when the launcher dies.
    """
    method = os.environ.get("CONVEYOR_START_METHOD") or ("forkserver" if sys.platform.startswith("linux") else "spawn")
    context = mp.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", "conveyor",
                                        "conveyor._forkserver"])
    return context


@contextlib.contextmanager
def _main_importable() -> Iterator[None]:
    """Children re-import the parent's ``__main__`` from its file; when there is no such file
    (``python -``, a notebook), hide the name so they skip that step."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None or os.path.exists(path):
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


def _stop(processes: Sequence[mp.process.BaseProcess]) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + _GRACE_SECONDS
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"was killed by signal {signal.Signals(-exitcode).name}"
    return f"exited with code {exitcode} without reporting a result"


def launch(fn: Callable[..., Any], nprocs: int, *, args: Sequence[Any] = (), backend: str | None = None,
           timeout: float | None = None, threads_per_rank: int | None = None,
           pg_timeout: float = 300.0) -> list[Any]:
    """Run ``fn(rank, nprocs, *args)`` in ``nprocs`` local processes and return their results.

    ``fn`` must be importable by name (a module-level function, also in the script's
    ``__main__``). ``timeout`` (seconds) bounds the whole job; ``pg_timeout`` bounds every
    communication wait. On CPU each rank gets ``cpu_count // nprocs`` threads unless
    ``threads_per_rank`` says otherwise. Raises :class:`LaunchError` naming the first rank that
    failed, with its traceback (or the signal that killed it); no child outlives the call.
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be at least 1, got {nprocs}")
    backend = backend or default_backend(nprocs)
    if threads_per_rank is None and backend == "gloo":
        threads_per_rank = max(1, (os.cpu_count() or 1) // nprocs)
    store = dist.TCPStore("127.0.0.1", 0, nprocs + 1, is_master=True, wait_for_workers=False)
    context = _context()
    pipes = [context.Pipe(duplex=False) for _ in range(nprocs)]
    lifeline, lifeline_writer = context.Pipe(duplex=False)
    processes = [
        context.Process(
            target=_worker,
            args=(rank, nprocs, store.port, backend, threads_per_rank, pg_timeout, fn, tuple(args), pipes[rank][1],
                  lifeline, lifeline_writer),
            name=f"conveyor-rank-{rank}",
        )
        for rank in range(nprocs)
    ]
    try:
        with _main_importable():
            for process in processes:
                process.start()
        for _, child_end in pipes:
            child_end.close()
        lifeline.close()
        return _collect(processes, [reader for reader, _ in pipes], timeout)
    finally:
        _stop(processes)
        lifeline.close()
        lifeline_writer.close()
        del store


def _collect(processes: Sequence[mp.process.BaseProcess], readers: Sequence[mp_connection.Connection],
             timeout: float | None) -> list[Any]:
    deadline = None if timeout is None else time.monotonic() + timeout
    results: dict[int, Any] = {}
    returned: list[int] = []  # ranks in the order their results arrived
    failures: list[tuple[int, str, bool]] = []  # (rank, details, secondary)
    pending = set(range(len(processes)))
    first_failure_at: float | None = None
    while pending:
        now = time.monotonic()
        if first_failure_at is not None and (now - first_failure_at > 0.5 or
                                             any(not secondary for _, _, secondary in failures)):
            break
        if deadline is not None and now >= deadline:
            running = sorted(pending)
            raise LaunchError(f"job timed out after {timeout:g} s; ranks {running} were still running "
                              "(raise launch(timeout=...) if the job is just slow)", rank=running[0])
        wait_for: dict[Any, int] = {}
        for rank in pending:
            wait_for[readers[rank]] = rank
            wait_for[processes[rank].sentinel] = rank
        remaining = None if deadline is None else max(0.0, deadline - now)
        if first_failure_at is not None:
            remaining = 0.1
        for ready in mp_connection.wait(list(wait_for), timeout=remaining):
            rank = wait_for[ready]
            if rank not in pending:
                continue
            reader = readers[rank]
            if reader.poll():
                try:
                    message = reader.recv()
                except EOFError:
                    message = None
            else:
                message = None
            if message is None:
                if processes[rank].is_alive() and ready is reader:
                    continue
                processes[rank].join(1.0)
                failures.append((rank, f"rank {rank} {_describe_exit(processes[rank].exitcode)}", False))
            elif message[0] == "ok":
                results[rank] = pickle.loads(message[1])
                returned.append(rank)
            else:
                failures.append((rank, message[1], message[2]))
            pending.discard(rank)
            if failures and first_failure_at is None:
                first_failure_at = time.monotonic()
    if failures and returned and all(secondary for _, _, secondary in failures):
        left = returned[0]  # every failure is a lost peer: the rank that returned first left them waiting
        failed = sorted(r for r, _, _ in failures)
        details = min(failures, key=lambda failure: failure[0])[1]
        raise LaunchError(f"rank {left} returned while the other ranks still needed it: rank {failed[0]} then "
                          f"failed waiting for it{f' (ranks {failed})' if len(failed) > 1 else ''}; every rank must "
                          "make the same calls (the same number of steps, forward and stream calls)",
                          rank=left, details=details)
    if failures:
        primary = [f for f in failures if not f[2]] or failures
        rank, details, _ = min(primary, key=lambda failure: failure[0])
        others = sorted({r for r, _, _ in failures} - {rank})
        also = f" (ranks {others} failed after it)" if others else ""
        raise LaunchError(f"rank {rank} failed{also}", rank=rank, details=details)
    return [results[rank] for rank in range(len(processes))]


def run(fn: Callable[..., Any], *args: Any, backend: str | None = None) -> Any:
    """Under ``torchrun``: join the existing job (RANK, WORLD_SIZE, MASTER_ADDR, ... from the
    environment), call ``fn(rank, world_size, *args)`` and return its result."""
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise LaunchError(f"conveyor.run needs torchrun's environment; {missing} are not set "
                          "(start the script with torchrun, or use conveyor.launch for local processes)")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    owns_group = not dist.is_initialized()
    if owns_group:
        backend = backend or default_backend(int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        return fn(rank, world_size, *args)
    finally:
        if owns_group:
            dist.destroy_process_group()
