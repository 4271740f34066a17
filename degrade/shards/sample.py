"""What reading a dataset gives: one `Sample`, or a `SampleBatch` of several with their arrays stacked.

Pixels come out as stored, uint8 (convert at the consumer: x / 255 for the pipeline's float32 images).
The parameter record is kept as its stored JSON and parsed into a DegradationParams the first time
`params` is used: most readers (a training loader) never need it, and parsing costs more than reading.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from degrade.errors import DegradeError, SampleIndexError, SampleIndexTypeError
from degrade.params import DegradationParams


def parse_record(text: str, where: str | None) -> DegradationParams:
    """A stored record parsed; its DegradeError led by `where` (which sample), where given."""
    try:
        return DegradationParams.from_json(text)
    except DegradeError as exc:
        if where is None:
            raise
        raise type(exc)(f"{where}: {exc}") from None


class Sample:
    """One stored sample: hr (P, P, 3) uint8, lr (P/4, P/4, 3) uint8, v (33,) float32, and its record.

    Unpacks like the 4-tuple it replaces: ``hr, lr, v, params = ds[i]``. Build it with the record
    (``Sample(hr, lr, v, params)``) or, as the reader does, with the record's JSON
    (``Sample(hr, lr, v, record_json=text)``): `params` is then parsed on first use (a malformed record
    raises the DegradeError of :meth:`DegradationParams.from_json` there, led by `where`, e.g. "sample 7
    (shard-00000.h5 row 7)", where given).
    """

    __slots__ = ("hr", "lr", "v", "_params", "_json", "_where")

    def __init__(self, hr: NDArray[np.uint8], lr: NDArray[np.uint8], v: NDArray[np.float32],
                 params: DegradationParams | None = None, *, record_json: str | None = None,
                 where: str | None = None):
        if (params is None) == (record_json is None):
            raise TypeError("give the record (params) or its JSON (record_json): one of them, not both or neither")
        self.hr, self.lr, self.v = hr, lr, v
        self._params, self._json, self._where = params, record_json, where

    @property
    def params(self) -> DegradationParams:
        if self._params is None:
            self._params = parse_record(self.record_json, self._where)
        return self._params

    @property
    def record_json(self) -> str:
        """The parameter record as JSON (as stored in the shard's `params` dataset)."""
        if self._json is None:
            self._json = self.params.to_json()
        return self._json

    def __iter__(self) -> Iterator[Any]:
        return iter((self.hr, self.lr, self.v, self.params))

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> Any:
        if isinstance(i, int) and -4 <= i < 4 and i % 4 != 3:  # hr, lr or v: the record stays unparsed
            return (self.hr, self.lr, self.v)[i % 4]
        return tuple(self)[i]

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.hr, self.lr, self.v, self._params, self._json, self._where)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.hr, self.lr, self.v, self._params, self._json, *where = state  # (pickles before `where`: 5 items)
        self._where = where[0] if where else None

    def __repr__(self) -> str:
        return f"Sample(hr {self.hr.shape} {self.hr.dtype}, lr {self.lr.shape}, v {self.v.shape})"


class SampleBatch:
    """Several stored samples (`ds[a:b]`), arrays stacked: hr (n, P, P, 3) uint8, lr (n, P/4, P/4, 3) uint8,
    v (n, 33) float32, `indices` (n,) their global sample indices, `params` their records (parsed on first use).

    A sequence of samples too: ``len(batch)``, ``batch[j]`` (a :class:`Sample` whose arrays are views into
    the batch's) and iteration.
    """

    __slots__ = ("hr", "lr", "v", "indices", "record_json", "_params")

    def __init__(self, hr: NDArray[np.uint8], lr: NDArray[np.uint8], v: NDArray[np.float32],
                 indices: NDArray[np.int64], record_json: Sequence[str]):
        self.hr, self.lr, self.v, self.indices = hr, lr, v, indices
        self.record_json = list(record_json)
        self._params: list[DegradationParams] | None = None

    @property
    def params(self) -> list[DegradationParams]:
        if self._params is None:
            self._params = [parse_record(text, f"sample {int(i)}") for text, i in zip(self.record_json, self.indices)]
        return self._params

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int | slice) -> Sample | SampleBatch:
        """batch[j], a Sample (negative j from the end), or batch[a:b:c], a SampleBatch of views."""
        if isinstance(j, slice):
            return SampleBatch(self.hr[j], self.lr[j], self.v[j], self.indices[j], self.record_json[j])
        try:
            j = range(len(self))[operator.index(j)]  # negative indices as a sequence has them
        except TypeError:
            raise SampleIndexTypeError(f"a batch index must be an integer or a slice, got {type(j).__name__}") \
                from None
        except IndexError:
            raise SampleIndexError(f"sample {j} is outside this batch of {len(self)}") from None
        if self._params is not None:
            return Sample(self.hr[j], self.lr[j], self.v[j], self._params[j])
        return Sample(self.hr[j], self.lr[j], self.v[j], record_json=self.record_json[j],
                      where=f"sample {int(self.indices[j])}")

    def __iter__(self) -> Iterator[Sample]:
        return (self[j] for j in range(len(self)))

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.hr, self.lr, self.v, self.indices, self.record_json)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.__init__(*state)

    def __repr__(self) -> str:
        return f"SampleBatch({len(self)} samples, hr {self.hr.shape} {self.hr.dtype})"
