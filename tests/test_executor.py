"""degrade.shards.executor.OrderedMap: results in order whoever makes them (a thread, loky workers, or the
consuming process itself while the workers start), failures raised at the consumer, refusals."""

from __future__ import annotations

import os
import time

import pytest

from degrade.errors import DatasetError
from degrade.shards.executor import OrderedMap


class Square:
    """A picklable task that says which process made each result; `start_delay` seconds pass when a worker
    unpickles it (at its start-up), as a slow worker start would."""

    def __init__(self, start_delay: float = 0.0, fail_at: int | None = None):
        self.start_delay, self.fail_at = start_delay, fail_at

    def __setstate__(self, state):
        self.__dict__.update(state)
        time.sleep(self.start_delay)

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


def test_the_consumer_makes_items_itself_while_the_workers_start():
    with OrderedMap(Square(start_delay=1.0), jobs=2, ahead=8) as run:
        results = list(run(range(30)))
    assert [r for r, _ in results] == [i * i for i in range(30)]
    pids = {pid for _, pid in results}
    assert os.getpid() in pids and len(pids) >= 2  # some made here, the rest by the workers


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failing_item_raises_at_the_consumer(jobs):
    with pytest.raises(ValueError, match="item 7 fails"):
        with OrderedMap(Square(fail_at=7), jobs=jobs) as run:
            for _ in run(range(20)):
                pass


def test_jobs_below_one_are_refused():
    with pytest.raises(DatasetError, match="jobs must be >= 1"):
        OrderedMap(Square(), jobs=0)
