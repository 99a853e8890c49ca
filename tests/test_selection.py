"""
Tests for L{rrbalancer.selection.SmoothWeightedRoundRobin}.
"""

from collections import Counter

from twisted.trial.unittest import TestCase

from rrbalancer.selection import SmoothWeightedRoundRobin


def selector(weights):
    """
    A selector reading weights from C{weights} (a dict that tests may
    change between picks).
    """
    return SmoothWeightedRoundRobin(weights.__getitem__)


def picks(s, candidates, n, exclude=()):
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
