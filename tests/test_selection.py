"""
Tests for L{rrbalancer.selection}: NGINX's smooth weighted round robin,
and the structures that pick in a time that does not grow with the number
of candidates.
"""

from collections import Counter

from twisted.trial.unittest import TestCase

from rrbalancer.selection import (
    SMALL_SET,
    Candidates,
    EarliestDeadlineFirst,
    Rotation,
    SmoothWeightedRoundRobin,
)


def selector(weights):
    """
    A selector reading weights from C{weights} (a dict that tests may
    change between picks).
    """
    return SmoothWeightedRoundRobin(weights.__getitem__)


def picks(s, candidates, n, exclude=()):
    """
    C{n} picks as one string; C{candidates} is None for the structures that
    keep their own.
    """
    if candidates is None:
        return "".join(s.pick(exclude) for _ in range(n))
    return "".join(s.pick(candidates, exclude) for _ in range(n))


class SmoothWeightedRoundRobinTests(TestCase):
    def test_nginxSequence(self):
        """
        Weights 5, 1, 1 give a a b a c a a, NGINX's sequence, cycle after
        cycle: the heavy backend's turns are spread out.
        """
        s = selector({"a": 5, "b": 1, "c": 1})
        for cycle in range(4):
            self.assertEqual(picks(s, "abc", 7), "aabacaa", f"cycle {cycle}")

    def test_weightsRespectedOverManyCycles(self):
        s = selector({"a": 3, "b": 2, "c": 1})
        counts = Counter(picks(s, "abc", 6 * 50))
        self.assertEqual(counts, Counter({"a": 150, "b": 100, "c": 50}))
        # Never three in a row of the heaviest with these weights.
        self.assertNotIn("aaa", picks(s, "abc", 60))

    def test_equalWeightsRotate(self):
        """
        With equal weights it is plain round robin, in the order offered.
        """
        s = selector({"a": 1, "b": 1, "c": 1, "d": 1})
        self.assertEqual(picks(s, "abcd", 12), "abcd" * 3)
        s = selector({"a": 4, "b": 4})
        self.assertEqual(picks(s, "ab", 6), "ababab")

    def test_single(self):
        s = selector({"a": 7})
        self.assertEqual(picks(s, "a", 3), "aaa")

    def test_noCandidates(self):
        s = selector({})
        self.assertIsNone(s.pick([]))

    def test_exclude(self):
        """
        An excluded candidate is never picked, the rest keep rotating.
        """
        s = selector({"a": 1, "b": 1, "c": 1})
        self.assertEqual(picks(s, "abc", 6, exclude={"b"}), "acacac")
        s = selector({"a": 5, "b": 1, "c": 1})
        self.assertNotIn("a", picks(s, "abc", 10, exclude=["a"]))

    def test_excludeAll(self):
        s = selector({"a": 1, "b": 1})
        self.assertIsNone(s.pick("ab", exclude="ab"))
        # Nothing was charged for the pick that found nobody.
        self.assertEqual(picks(s, "ab", 4), "abab")

    def test_candidatesComeAndGo(self):
        """
        The candidates are those offered at each pick: a backend missing
        from one pick (down) is simply not chosen, and is chosen again once
        offered again.
        """
        s = selector({"a": 1, "b": 1, "c": 1})
        self.assertEqual(picks(s, "abc", 3), "abc")
        self.assertEqual(picks(s, "ac", 4), "acac")
        self.assertEqual(sorted(picks(s, "abc", 3)), ["a", "b", "c"])

    def test_weightChange(self):
        """
        Weights are read at every pick, so a change takes effect at once.
        """
        weights = {"a": 1, "b": 1}
        s = selector(weights)
        self.assertEqual(picks(s, "ab", 4), "abab")
        weights["a"] = 3
        counts = Counter(picks(s, "ab", 40))
        self.assertEqual(counts, Counter({"a": 30, "b": 10}))
        weights["a"] = 1
        weights["b"] = 4
        counts = Counter(picks(s, "ab", 50))
        self.assertEqual(counts, Counter({"a": 10, "b": 40}))

    def test_forget(self):
        """
        forget() drops a candidate's score: one that comes back starts
        afresh, and forgetting an unknown candidate is harmless.
        """
        s = selector({"a": 1, "b": 1, "c": 1})
        picks(s, "abc", 2)
        s.forget("b")
        s.forget("unknown")
        self.assertNotIn("b", s._scores)
        # With b forgotten the rest still share fairly (scores left over from
        # the three-way rotation may tip a pick or two at first).
        counts = Counter(picks(s, "ac", 100))
        self.assertApproximates(counts["a"], 50, 1)
        self.assertApproximates(counts["c"], 50, 1)
        # b, brought back, gets its share again.
        counts = Counter(picks(s, "abc", 300))
        for name in "abc":
            self.assertApproximates(counts[name], 100, 2)

    def test_forgottenScoreDoesNotLinger(self):
        """
        A removed backend whose score was high does not, when a backend of
        the same identity is added back, win several picks in a row.
        """
        weights = {"a": 1, "b": 1, "c": 100}
        s = selector(weights)
        s.pick("abc")  # c wins and pays back: a and b now hold +1 each
        s.forget("a")
        s.forget("b")
        s.forget("c")
        weights["c"] = 1
        self.assertEqual(picks(s, "abc", 3), "abc")


class CountingExclude(frozenset):
    """
    An C{exclude} that counts the membership tests a pick makes: every
    candidate a pick looks at is tested against it.
    """

    def __new__(cls, items=()):
        self = super().__new__(cls, items)
        self.looks = 0
        return self

    def __contains__(self, item):
        self.looks += 1
        return frozenset.__contains__(self, item)

    def __len__(self):
        # Counted as non-empty, so that every pick tests its candidates.
        return max(1, frozenset.__len__(self))

    def __bool__(self):
        return True


class RotationTests(TestCase):
    def rotation(self, items):
        r = Rotation()
        for item in items:
            r.add(item)
        return r

    def test_roundRobinInOrderAdded(self):
        r = self.rotation("abcd")
        self.assertEqual(picks(r, None, 9), "abcdabcda")
        self.assertEqual(list(r), list("bcda"))

    def test_empty(self):
        r = Rotation()
        self.assertIsNone(r.pick())
        r.add("a")
        r.remove("a")
        self.assertIsNone(r.pick())
        self.assertEqual(len(r), 0)

    def test_removeKeepsTheTurn(self):
        """
        Removing the member whose turn is next hands the turn to the one
        after it; removing another changes nothing else.
        """
        r = self.rotation("abcd")
        self.assertEqual(picks(r, None, 1), "a")
        r.remove("b")
        self.assertEqual(picks(r, None, 3), "cda")
        r.remove("a")
        self.assertEqual(picks(r, None, 4), "cdcd")
        r.remove("nothing")

    def test_addedMemberEndsTheCurrentRound(self):
        """
        A member that joins gets its first turn once every member already
        there has had one more.
        """
        r = self.rotation("abc")
        self.assertEqual(picks(r, None, 1), "a")
        r.add("x")
        self.assertEqual(picks(r, None, 8), "bcaxbcax")
        r.add("x")  # already there: no change
        self.assertEqual(len(r), 4)

    def test_exclude(self):
        r = self.rotation("abc")
        self.assertEqual(picks(r, None, 6, exclude={"b"}), "acacac")
        self.assertIsNone(r.pick(exclude="abc"))
        self.assertIsNone(r.pick(exclude="cbaxyz"))
        self.assertEqual(r.pick(exclude="xyzab"), "c")

    def test_pickLooksAtOneMember(self):
        """
        A pick looks at one member however many there are; with C{exclude},
        at most one more than it names.
        """
        r = self.rotation(range(10000))
        exclude = CountingExclude()
        for _ in range(100):
            r.pick(exclude)
        self.assertEqual(exclude.looks, 100)
        self.assertEqual(r.pick(), 100)
        tried = CountingExclude([101, 102, 5000])
        self.assertEqual(r.pick(tried), 103)
        self.assertEqual(tried.looks, 3)


class EarliestDeadlineFirstTests(TestCase):
    def edf(self, weights):
        e = EarliestDeadlineFirst()
        for item, weight in weights.items():
            e.add(item, weight)
        return e

    def test_shares(self):
        e = self.edf({"a": 5, "b": 1, "c": 1})
        counts = Counter(picks(e, None, 700))
        self.assertEqual(counts, Counter({"a": 500, "b": 100, "c": 100}))

    def test_spread(self):
        """
        The heavy member's turns are spread among the light ones'.
        """
        e = self.edf({"a": 5, "b": 1, "c": 1})
        self.assertEqual(picks(e, None, 7), "aabcaaa")
        e = self.edf({"a": 3, "b": 2, "c": 1})
        self.assertNotIn("aaa", picks(e, None, 60))

    def test_equalWeightsRotate(self):
        e = self.edf({"a": 2, "b": 2, "c": 2})
        self.assertEqual(picks(e, None, 9), "abcabcabc")

    def test_exclude(self):
        e = self.edf({"a": 5, "b": 1, "c": 1})
        self.assertNotIn("a", picks(e, None, 10, exclude={"a"}))
        self.assertIsNone(e.pick(exclude="abc"))
        counts = Counter(picks(e, None, 700))
        self.assertApproximates(counts["a"], 500, 10)

    def test_removeAndAddBack(self):
        e = self.edf({"a": 1, "b": 1, "c": 1})
        e.remove("b")
        e.remove("b")
        self.assertEqual(sorted(picks(e, None, 4)), list("aacc"))
        e.add("b", 1)
        self.assertEqual(Counter(picks(e, None, 30)), Counter({"a": 10, "b": 10, "c": 10}))
        self.assertEqual(len(e), 3)
        self.assertNotIn("z", e)

    def test_weightChange(self):
        e = self.edf({"a": 1, "b": 1})
        e.add("a", 3)
        self.assertEqual(Counter(picks(e, None, 40)), Counter({"a": 30, "b": 10}))

    def test_removedEntriesDoNotPileUp(self):
        e = self.edf({i: 1 + i % 3 for i in range(100)})
        for _ in range(50):
            for i in range(90):
                e.remove(i)
            for i in range(90):
                e.add(i, 2)
        self.assertLess(len(e._heap), 300)
        self.assertEqual(len(e), 100)

    def test_pickLooksAtLogarithmicallyManyMembers(self):
        """
        A pick looks at only the member it takes (the earliest deadline).
        """
        e = self.edf({i: 1 + i % 7 for i in range(10000)})
        exclude = CountingExclude()
        for _ in range(1000):
            e.pick(exclude)
        self.assertEqual(exclude.looks, 1000)


class CandidatesTests(TestCase):
    def candidates(self, weights):
        c = Candidates()
        for item, weight in weights.items():
            c.add(item, weight)
        return c

    def test_smallWeightedSetIsNGINXs(self):
        c = self.candidates({"a": 5, "b": 1, "c": 1})
        for cycle in range(3):
            self.assertEqual(picks(c, None, 7), "aabacaa", f"cycle {cycle}")

    def test_order(self):
        """
        The order that breaks a small weighted set's ties is C{order}'s.
        """
        c = Candidates(order=lambda name: -ord(name))
        for name in "abc":
            c.add(name, 1 if name == "a" else 2)
        self.assertEqual(picks(c, None, 5), "cbacb")

    def test_equalWeightsAtAnySize(self):
        c = self.candidates({name: 3 for name in "abcd"})
        self.assertEqual(picks(c, None, 8), "abcdabcd")

    def test_weightChangeSwitchesToWeighted(self):
        c = self.candidates({"a": 1, "b": 1})
        self.assertEqual(picks(c, None, 2), "ab")
        c.add("a", 3)
        self.assertEqual(c.weightOf("a"), 3)
        self.assertEqual(Counter(picks(c, None, 40)), Counter({"a": 30, "b": 10}))
        c.add("a", 1)
        self.assertEqual(sorted(picks(c, None, 4)), list("aabb"))

    def test_largeWeightedSet(self):
        weights = {i: 1 + i % 4 for i in range(SMALL_SET * 4)}
        c = self.candidates(weights)
        total = sum(weights.values())
        counts = Counter(c.pick() for _ in range(total * 3))
        self.assertEqual(counts, Counter({i: w * 3 for i, w in weights.items()}))

    def test_removeAndAdd(self):
        c = self.candidates({"a": 1, "b": 2, "c": 1})
        c.remove("b")
        c.remove("b")
        self.assertNotIn("b", c)
        self.assertEqual(len(c), 2)
        self.assertEqual(sorted(picks(c, None, 4)), list("aacc"))
        self.assertEqual(sorted(c), ["a", "c"])

    def test_pickCostDoesNotGrow(self):
        """
        Whatever the weights, a pick among ten thousand looks at a bounded
        number of them (NGINX's own loop over every one is kept for sets
        of at most C{SMALL_SET}).
        """
        for weights in ({i: 1 for i in range(10000)}, {i: 1 + i % 5 for i in range(10000)}):
            c = self.candidates(weights)
            exclude = CountingExclude()
            for _ in range(500):
                c.pick(exclude)
            self.assertEqual(exclude.looks, 500)
        small = self.candidates({i: 1 + i % 5 for i in range(SMALL_SET)})
        exclude = CountingExclude()
        small.pick(exclude)
        self.assertEqual(exclude.looks, SMALL_SET)

    def test_oldPickLooksAtEveryCandidate(self):
        """
        The counting itself: NGINX's loop, offered every candidate, looks
        at each of them.
        """
        s = SmoothWeightedRoundRobin(lambda item: 1)
        exclude = CountingExclude()
        s.pick(range(1000), exclude)
        self.assertEqual(exclude.looks, 1000)
