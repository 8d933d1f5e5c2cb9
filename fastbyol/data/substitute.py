"""Stand-ins for unreadable samples, so that every rank's batches stay full and in step.

A batch that shrinks or disappears on one rank only breaks data-parallel training: BatchNorm
fails on a micro-batch of one, a rank that skips a batch leaves its peers waiting in a
collective (a hang), and a new batch shape recompiles ``torch.compile`` graphs. So an
unreadable sample is never dropped: position ``i`` of a batch is filled by the first readable
sample among ``i, i + 1, i + 2, …`` (mod ``n``, the data set's size). The rule depends on the
files alone, not on the rank, the world size, the loader or what was read before, so every
run sees the same stand-ins. The stand-in keeps position ``i``'s random draws (its crop box
fitted to the stand-in's size) and carries its own label.
"""
from __future__ import annotations

from typing import Callable, Generic, Optional, Set, Tuple, TypeVar

from ..errors import FastByolError

T = TypeVar("T")


class NoReadableImage(FastByolError):
    """Not one sample of the data set can be read."""


class Substitutes(Generic[T]):
    """Finds each sample's stand-in and remembers the unreadable samples met (per process).

    Args:
        n: number of samples.
        describe: a sample's name for messages (its path).
    """

    def __init__(self, n: int, describe: Callable[[int], str] = str):
        self.n, self.describe = n, describe
        self.bad: Set[int] = set()

    def resolve(self, i: int, load: Callable[[int], Optional[T]]) -> Tuple[int, T]:
        """``(j, load(j))`` for the first ``j`` of ``i, i + 1, …`` (mod ``n``) that ``load``
        reads (``None`` means unreadable).

        Raises:
            NoReadableImage: no sample at all can be read.
        """
        for k in range(self.n):
            j = (i + k) % self.n
            if j in self.bad:
                continue
            item = load(j)
            if item is not None:
                return j, item
            self.bad.add(j)
        raise NoReadableImage(f"no readable image in the data set: all {self.n} files are corrupt or "
                              f"unreadable (e.g. {self.describe(i)})")


# The loaders' warning: count in this batch, count so far on this rank, an example file.
SUBSTITUTED_MSG = "replaced %d unreadable image(s) by the next readable one (%d so far on this rank), e.g. %s"
