"""degrade.shards.executor.OrderedMap: results in order whoever makes them (a thread or loky worker
processes), failures raised at the consumer, refusals."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from degrade.errors import DatasetError
from degrade.shards.executor import OrderedMap


class Square:
    """A picklable task that says which process made each result."""

    def __init__(self, fail_at: int | None = None):
        self.fail_at = fail_at

    def __eq__(self, other):
        return isinstance(other, Square) and vars(self) == vars(other)

    def __call__(self, item: int) -> tuple[int, int]:
        if item == self.fail_at:
            raise ValueError(f"item {item} fails")
        return item * item, os.getpid()


@pytest.mark.parametrize("jobs", [1, 2])
def test_results_come_in_order(jobs):
    with OrderedMap(Square(), jobs=jobs) as run:
        results = list(run(range(40)))
    assert [r for r, _ in results] == [i * i for i in range(40)]
    if jobs == 1:
        assert {pid for _, pid in results} == {os.getpid()}  # a thread of this process


@pytest.mark.parametrize("ahead", [1, 7])
def test_any_number_of_items_in_flight_gives_the_same_order(ahead):
    with OrderedMap(Square(), jobs=2, ahead=ahead) as run:
        results = list(run(range(30)))
    assert [r for r, _ in results] == [i * i for i in range(30)]
    assert os.getpid() not in {pid for _, pid in results}  # made by the worker processes


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failing_item_raises_at_the_consumer(jobs):
    with pytest.raises(ValueError, match="item 7 fails"):
        with OrderedMap(Square(fail_at=7), jobs=jobs) as run:
            for _ in run(range(20)):
                pass


def test_jobs_below_one_are_refused():
    with pytest.raises(DatasetError, match="jobs must be >= 1"):
        OrderedMap(Square(), jobs=0)


class Block:
    """A picklable task returning 3 MiB of bytes: results far larger than a default pipe buffer."""

    def __eq__(self, other):
        return isinstance(other, Block)

    def __call__(self, item: int) -> bytes:
        return bytes([item % 256]) * (3 << 20)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pipe sizes are a Linux feature")
def test_results_travel_through_a_1_mib_pipe_intact():
    """Linux: the pipe that brings the workers' results has a 1 MiB buffer (64 KiB by default; fewer
    rounds of write and read per 3.4 MB chunk), and 3 MiB results arrive whole and in order."""
    import fcntl

    from degrade.shards.executor import RESULT_PIPE_BYTES

    ordered = OrderedMap(Block(), jobs=2)
    with ordered as run:
        results = list(run(range(6)))
        size = fcntl.fcntl(ordered._executor._result_queue._reader.fileno(), fcntl.F_GETPIPE_SZ)
    assert results == [bytes([i]) * (3 << 20) for i in range(6)]
    limit = Path("/proc/sys/fs/pipe-max-size")
    if limit.exists() and int(limit.read_text()) < RESULT_PIPE_BYTES:
        pytest.skip("this system caps pipes below 1 MiB; the widening is best effort")
    assert size == RESULT_PIPE_BYTES == 1 << 20


class SigtermDisposition:
    """A picklable task: how the process that runs it handles SIGTERM."""

    def __eq__(self, other):
        return isinstance(other, SigtermDisposition)

    def __call__(self, item: int) -> tuple[int, int]:
        import signal

        return int(signal.getsignal(signal.SIGTERM)), os.getpid()


def test_worker_processes_leave_sigterm_to_the_consumer():
    """A SIGTERM to the whole process group (`timeout`, a scheduler) killed a worker at times while it sent
    a result, and loky's reader then waited for the rest for ever: make-dataset hung at its shutdown, 1 run
    in 3-6 (a review, with `timeout -s TERM 4 degrade make-dataset ... --jobs 2`). Workers ignore it now;
    the consuming process ends them."""
    import signal

    with OrderedMap(SigtermDisposition(), jobs=2) as run:
        results = list(run(range(8)))
    assert {disposition for disposition, _ in results} == {int(signal.SIG_IGN)}
    assert os.getpid() not in {pid for _, pid in results}
