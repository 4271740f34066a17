"""degrade.shards.executor.OrderedMap: results in order whoever makes them (a thread or loky worker
processes), failures raised at the consumer, refusals."""

from __future__ import annotations

import os

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
