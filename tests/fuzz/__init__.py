"""
Coverage-guided fuzzing harnesses, one module per target.

Each module has a C{check(data)} that drives the real code with the bytes
and raises L{AssertionError} when an invariant breaks; run as a script it
is an atheris fuzzer (C{tests/fuzz/run.sh}).  C{tests/test_fuzz.py} replays
the committed corpus (C{tests/fuzz/corpus/<target>/}) through C{check}
without atheris.
"""
