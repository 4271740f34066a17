"""One ordered map over a thread, loky worker processes, or a joblib backend such as Dask.

``with OrderedMap(task, jobs=J, backend=B) as run: for result in run(items): ...`` yields ``task(item)``
for every item, in the order of `items`, while the caller consumes the results (make-dataset writes them):

- jobs == 1: `task` runs in a background thread of this process, a few items ahead of the consumer
  (h5py releases the GIL while it compresses and writes);
- jobs >= 2: `task` runs in that many loky worker processes; it is pickled once per worker, at start-up
  (a dataset configuration may list many sources), and tasks then carry only their item; up to `ahead`
  (default 2 * jobs + 1) items are in flight;
- backend (e.g. "dask"): joblib's backend of that name runs the items; `task` travels with every item.

`task` is a picklable callable, typically a bound method of an object that owns its state (its caches are
then per worker process). Worker processes tune the allocator and end when the consuming process is gone.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import os
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from degrade.allocator import tune_allocator
from degrade.errors import DatasetError

T = TypeVar("T")
R = TypeVar("R")

PARENT_POLL_SECONDS = 0.5


def watch_parent(parent: int) -> None:
    """End this process (os._exit) within PARENT_POLL_SECONDS once process `parent` is no longer its parent.

    loky's workers outlive a parent killed with SIGKILL or SIGTERM (they were seen alive, ~270 MB each,
    20 minutes later); an orphan is re-parented, so its parent id changes.
    """

    def poll() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=poll, name="degrade-parent-watch", daemon=True).start()


class _WorkerSlot:
    """The task a loky worker process was started with. A worker's initialiser can hand its tasks
    something only through process state, so this one slot exists; it is set in worker processes only."""

    task: Callable[[Any], Any] | None = None

    @classmethod
    def install(cls, task: Callable[[Any], Any], parent: int | None) -> None:
        """Set up a worker process: its task, its allocator, the watch on its parent, and SIGTERM ignored.

        A SIGTERM to the whole process group (`timeout`, a scheduler's stop) killed the workers at once,
        one of them at times in the middle of sending a result: loky's reader then waited for the rest
        for ever, and make-dataset hung at its shutdown holding the dataset's lock (1 run in 3-6). The
        consuming process alone handles SIGTERM now: it lets the items in flight finish and ends the
        workers (loky kills them with SIGKILL), and an orphaned worker ends itself (watch_parent)."""
        cls.task = task
        tune_allocator()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if parent is not None:
            watch_parent(parent)

    @classmethod
    def call(cls, item: Any) -> Any:
        if cls.task is None:
            raise RuntimeError("worker process started without a task")
        return cls.task(item)


def _call_in_worker(task: Callable[[T], R], item: T) -> R:
    """One item on a joblib backend's worker (a Dask worker: a long-lived process of someone else's)."""
    tune_allocator()
    return task(item)


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _prefetched(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """Iterate `items` in a background thread, at most `depth` ahead of the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as exc:  # handed to the consumer, raised there
            put(_Failure(exc))

    thread = threading.Thread(target=produce, name="degrade-producer", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()


def usable_cores() -> int:
    """The cores this process may run on (its affinity, as a scheduler or taskset sets it; else all), as
    make-dataset caps its workers and dasr-train's default --workers counts them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class OrderedMap(Generic[T, R]):
    """Context manager giving `run(items) -> iterator of task(item), in order` (see the module's docstring)."""

    def __init__(self, task: Callable[[T], R], *, jobs: int, backend: str | None = None, ahead: int | None = None):
        if jobs < 1:
            raise DatasetError(f"jobs must be >= 1, got {jobs}")
        self.task, self.jobs, self.backend = task, jobs, backend
        # Items submitted ahead of the consumer with worker processes. 4J + 2 (and making items in the
        # consuming process while the workers start) measured no faster on 2 cores (docs/benchmarks.md).
        self.ahead = 2 * jobs + 1 if ahead is None else ahead
        self._parallel: Any = None
        self._executor: Any = None
        self._window: deque[Any] = deque()  # futures submitted and not yet consumed
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Callable[[Iterable[T]], Iterator[R]]:
        if self.backend:
            import joblib

            # parallel_config (not Parallel(backend=...)) registers external backends such as dask.
            self._stack.enter_context(joblib.parallel_config(backend=self.backend, n_jobs=self.jobs))
            self._parallel = self._stack.enter_context(joblib.Parallel(return_as="generator",
                                                                       pre_dispatch="2*n_jobs"))
        elif self.jobs >= 2:
            from joblib.externals.loky import get_reusable_executor

            # The task reaches each worker once, at start-up; a different task (initargs) restarts the workers.
            self._executor = get_reusable_executor(max_workers=self.jobs, initializer=_WorkerSlot.install,
                                                   initargs=(self.task, os.getpid()))
            _widen_result_pipe(self._executor)
        return self.run

    def __exit__(self, *exc: Any) -> Any:
        if exc[0] is not None and self._executor is not None:  # after a failure, do not leave workers busy
            # Let the few items in flight finish first (at most `ahead` chunks): killing the workers with
            # items still queued races loky's manager thread, which then prints a KeyError traceback.
            concurrent.futures.wait(self._window, timeout=FINISH_IN_FLIGHT_S)
            self._executor.shutdown(wait=True, kill_workers=True)
        return self._stack.__exit__(*exc)

    def run(self, items: Iterable[T]) -> Iterator[R]:
        if self._parallel is not None:
            import joblib

            yield from self._parallel(joblib.delayed(_call_in_worker)(self.task, item) for item in items)
        elif self._executor is None:
            yield from _prefetched((self.task(item) for item in items), depth=2)
        else:
            yield from self._run_in_workers(items)

    def _run_in_workers(self, items: Iterable[T]) -> Iterator[R]:
        # Futures left in the window when the consumer stops early are not cancelled: after a failure
        # __exit__ kills the workers (loky then fails every pending future, and one cancelled first makes
        # its manager thread raise InvalidStateError); otherwise they finish and are dropped.
        pending = iter(items)
        window = self._window
        window.extend(self._executor.submit(_WorkerSlot.call, item) for item in itertools.islice(pending, self.ahead))
        while window:
            result = window.popleft().result()
            nxt = next(pending, _END)
            if nxt is not _END:
                window.append(self._executor.submit(_WorkerSlot.call, nxt))
            yield result


RESULT_PIPE_BYTES = 1 << 20  # Linux's default limit for one pipe (/proc/sys/fs/pipe-max-size)


def _widen_result_pipe(executor: Any) -> None:
    """Give the pipe that carries the workers' results to this process a 1 MiB buffer (Linux; 64 KiB by
    default). A chunk of 16 samples of 256 px is 3.4 MB; through 64 KiB it takes ~50 rounds of write,
    wake-up and read: 0.52 ms of CPU per sample (both ends) against 0.20 ms with 1 MiB, measured with
    two threads and a pipe on the 2-core machine (docs/benchmarks.md). Best effort: another loky, a
    lower system limit or another OS leave the pipe as it is."""
    try:
        import fcntl

        fcntl.fcntl(executor._result_queue._reader.fileno(), fcntl.F_SETPIPE_SZ, RESULT_PIPE_BYTES)
    except (ImportError, AttributeError, OSError, ValueError):
        pass


_END = object()
FINISH_IN_FLIGHT_S = 60  # after a failure, how long the items already in flight may take to finish
