"""
Choosing the next backend.

The semantics are NGINX's smooth weighted round robin: every pick, each
candidate's running score grows by its weight, the highest score wins and
pays back the total weight.  It spreads a heavy backend's turns out
(weights 5, 1, 1 give C{a a b a c a a}) instead of sending it five requests
in a row, and with equal weights it is plain round robin.

That algorithm looks at every candidate at every pick, which a balancer of
ten thousand backends cannot afford per request.  L{Candidates} keeps the
candidates as they change instead, and picks in a time that does not grow
with their number: a ring (L{Rotation}) when weights are equal, NGINX's own
loop over a set small enough for it, and an earliest-deadline-first heap
(L{EarliestDeadlineFirst}) for a large weighted set, whose shares are the
same and whose order differs from NGINX's only in how ties fall.
"""

import heapq
from typing import (
    Callable,
    Collection,
    Dict,
    Generic,
    Iterable,
    Iterator,
    List,
    Optional,
    TypeVar,
)

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



class Rotation(Generic[T]):
    """
    Plain round robin over a ring that members join and leave one at a
    time, each change and each pick touching a constant number of members
    whatever the ring's size.

    A member that joins takes the place just before the one whose turn is
    next: it gets its first turn once every member already there has had
    one more, neither jumping the queue nor waiting longer than a round.
    """

    def __init__(self) -> None:
        self._next: Dict[T, T] = {}
        self._prev: Dict[T, T] = {}
        self._cursor: Optional[T] = None

    def __len__(self) -> int:
        return len(self._next)

    def __contains__(self, item: T) -> bool:
        return item in self._next

    def __iter__(self) -> Iterator[T]:
        """
        The members, starting with the one whose turn is next.
        """
        item = self._cursor
        for _ in range(len(self._next)):
            yield item
            item = self._next[item]

    def add(self, item: T) -> None:
        if item in self._next:
            return
        cursor = self._cursor
        if cursor is None:
            self._next[item] = self._prev[item] = item
            self._cursor = item
            return
        last = self._prev[cursor]
        self._next[last] = item
        self._prev[item] = last
        self._next[item] = cursor
        self._prev[cursor] = item

    def remove(self, item: T) -> None:
        following = self._next.pop(item, None)
        if following is None:
            return
        preceding = self._prev.pop(item)
        if following == item:
            self._cursor = None
            return
        self._next[preceding] = following
        self._prev[following] = preceding
        if self._cursor == item:
            self._cursor = following

    def pick(self, exclude: Collection[T] = ()) -> Optional[T]:
        """
        The next member not in C{exclude}; the walk past excluded members
        is as long as C{exclude} (the backends one request already tried),
        never the ring.
        """
        item = self._cursor
        if item is None:
            return None
        nexts = self._next
        if exclude:
            for _ in range(min(len(exclude), len(nexts))):
                if item not in exclude:
                    break
                item = nexts[item]
            else:
                if item in exclude:
                    return None
        self._cursor = nexts[item]
        return item


class EarliestDeadlineFirst(Generic[T]):
    """
    Weighted round robin in logarithmic time: each member has a deadline on
    a virtual clock, the earliest is picked and its next deadline is
    C{1 / weight} later (as in Envoy's EDF scheduler).  A member starts half
    a step ahead of the clock, so that heavy members' turns are spread
    among the light ones' rather than bunched at the start of a round.

    Members that leave are marked and dropped as they surface (or all at
    once when they outnumber the others), so that leaving costs no search.
    """

    def __init__(self) -> None:
        # [deadline, sequence, step, member, live]
        self._heap: List[list] = []
        self._entries: Dict[T, list] = {}
        self._dead = 0
        self._now = 0.0
        self._sequence = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, item: T) -> bool:
        return item in self._entries

    def add(self, item: T, weight: int) -> None:
        if item in self._entries:
            self.remove(item)
        step = 1.0 / weight
        self._sequence += 1
        entry = [self._now + step / 2, self._sequence, step, item, True]
        self._entries[item] = entry
        heapq.heappush(self._heap, entry)

    def remove(self, item: T) -> None:
        entry = self._entries.pop(item, None)
        if entry is None:
            return
        entry[4] = False
        self._dead += 1
        if self._dead > len(self._entries) + 16:
            self._heap = [e for e in self._heap if e[4]]
            heapq.heapify(self._heap)
            self._dead = 0

    def pick(self, exclude: Collection[T] = ()) -> Optional[T]:
        heap = self._heap
        aside = []
        chosen = None
        while heap:
            entry = heap[0]
            if not entry[4]:
                heapq.heappop(heap)
                self._dead -= 1
                continue
            if exclude and entry[3] in exclude:
                aside.append(heapq.heappop(heap))
                continue
            chosen = entry[3]
            self._now = entry[0]
            self._sequence += 1
            entry[0] += entry[2]
            entry[1] = self._sequence
            heapq.heapreplace(heap, entry)
            break
        for entry in aside:
            heapq.heappush(heap, entry)
        return chosen


# Up to this many candidates of unequal weights, a pick runs NGINX's own
# algorithm over all of them: its exact sequence, at a cost bounded by
# this number.  Beyond, the earliest-deadline-first schedule takes over.
SMALL_SET = 32


class Candidates(Generic[T]):
    """
    The members that may be picked (backends up, or backups up), kept up
    to date one change at a time, and the choice among them.

    Equal weights (the usual case, at any size) are plain round robin, in
    constant time; a small set of unequal weights gets NGINX's smooth
    weighted round robin exactly; a large one, earliest deadline first in
    logarithmic time.  The three agree on the share each member gets.

    @param order: sorts a small weighted set before each NGINX pick, as the
        order candidates are offered in decides its ties.
    """

    def __init__(self, order: Optional[Callable[[T], object]] = None) -> None:
        self._weights: Dict[T, int] = {}
        # weight -> how many members have it: the set is uniform while this
        # has one key.
        self._weightCounts: Dict[int, int] = {}
        self._rotation: Rotation[T] = Rotation()
        self._edf: EarliestDeadlineFirst[T] = EarliestDeadlineFirst()
        self._smooth: SmoothWeightedRoundRobin[T] = SmoothWeightedRoundRobin(
            self._weights.__getitem__
        )
        self._order = order
        self._small: Optional[List[T]] = None
        # The members in a list, for a pick at random in constant time (a
        # removal swaps the last member into the gap).
        self._members: List[T] = []
        self._index: Dict[T, int] = {}
        # Changes with the membership (not with weights): a policy that
        # keeps something per member knows when to look again.
        self.version = 0
        self.totalWeight = 0

    def __len__(self) -> int:
        return len(self._weights)

    def __contains__(self, item: T) -> bool:
        return item in self._weights

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._weights))

    def weightOf(self, item: T) -> Optional[int]:
        return self._weights.get(item)

    def add(self, item: T, weight: int) -> None:
        """
        Add C{item}, or give a member its new weight.
        """
        old = self._weights.get(item)
        if old == weight:
            return
        if old is not None:
            self._uncount(old)
            self.totalWeight -= old
        else:
            self.version += 1
        self.totalWeight += weight
        self._weights[item] = weight
        self._weightCounts[weight] = self._weightCounts.get(weight, 0) + 1
        if item not in self._index:
            self._index[item] = len(self._members)
            self._members.append(item)
        self._rotation.add(item)
        self._edf.add(item, weight)
        self._small = None

    def remove(self, item: T) -> None:
        weight = self._weights.pop(item, None)
        if weight is None:
            return
        self.version += 1
        self.totalWeight -= weight
        self._uncount(weight)
        at = self._index.pop(item)
        last = self._members.pop()
        if last is not item:
            self._members[at] = last
            self._index[last] = at
        self._rotation.remove(item)
        self._edf.remove(item)
        self._smooth.forget(item)
        self._small = None

    def _uncount(self, weight: int) -> None:
        left = self._weightCounts[weight] - 1
        if left:
            self._weightCounts[weight] = left
        else:
            del self._weightCounts[weight]

    def randomMember(self, random: Callable[[], float]) -> Optional[T]:
        """
        A member chosen uniformly at random, in constant time.
        """
        members = self._members
        if not members:
            return None
        return members[int(random() * len(members)) % len(members)]

    @property
    def maxWeight(self) -> int:
        return max(self._weightCounts) if self._weightCounts else 0

    def pick(self, exclude: Collection[T] = ()) -> Optional[T]:
        if len(self._weightCounts) <= 1:
            return self._rotation.pick(exclude)
        if len(self._weights) <= SMALL_SET:
            small = self._small
            if small is None:
                small = self._small = sorted(self._weights, key=self._order) if (
                    self._order is not None
                ) else list(self._weights)
            return self._smooth.pick(small, exclude)
        return self._edf.pick(exclude)
