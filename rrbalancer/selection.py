"""
Choosing the next backend: smooth weighted round robin.

This is the algorithm NGINX uses: every pick, each candidate's running score
grows by its weight, the highest score wins and pays back the total weight.
It spreads a heavy backend's turns out (weights 5, 1, 1 give
C{a a b a c a a}) instead of sending it five requests in a row, and with
equal weights it is plain round robin.
"""

from typing import Callable, Collection, Generic, Iterable, Optional, TypeVar

T = TypeVar("T")


class SmoothWeightedRoundRobin(Generic[T]):
    """
    Picks among the candidates it is offered each time, so that backends can
    come, go, fail and recover between picks without any bookkeeping here
    beyond the scores.

    @param weightOf: the current weight of a candidate (weights can change at
        run time, so they are read at every pick).
    """

    def __init__(self, weightOf: Callable[[T], int]) -> None:
        self._weightOf = weightOf
        self._scores = {}

    def pick(self, candidates: Iterable[T], exclude: Collection[T] = ()) -> Optional[T]:
        best = None
        bestScore = 0
        total = 0
        scores = self._scores
        for candidate in candidates:
            if candidate in exclude:
                continue
            weight = self._weightOf(candidate)
            total += weight
            score = scores.get(candidate, 0) + weight
            scores[candidate] = score
            if best is None or score > bestScore:
                best = candidate
                bestScore = score
        if best is not None:
            scores[best] = bestScore - total
        return best

    def forget(self, candidate: T) -> None:
        """
        Drop a removed candidate's score.
        """
        self._scores.pop(candidate, None)

