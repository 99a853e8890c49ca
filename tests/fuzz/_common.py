"""
What the harnesses share: how the fuzzer's bytes become choices and
pieces, the errors logged while a harness runs, and the corpus.
"""

import contextlib
import os
import shlex
import sys
import types
from typing import List, Tuple

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def instrumented(name: str):
    """
    Wrap a harness's imports: when the harness runs as a fuzzer
    (C{name} is C{"__main__"}), atheris instruments rrbalancer as it is
    imported, so that the fuzzer sees which branches an input reached.
    Imported by the tests, it does nothing and atheris is not needed.
    """
    if name != "__main__":
        return contextlib.nullcontext()
    import atheris

    return atheris.instrument_imports(include=["rrbalancer"])


def instrumentModules(*modules) -> None:
    """
    Instrument the functions and methods defined in C{modules} (already
    imported): the Twisted code a harness goes through, such as the HTTP
    parser the balancer extends.  (Instrumenting all of Twisted as it is
    imported would cost seconds at every start.)
    """
    import atheris

    seen = set()

    def instrument(namespace, module) -> None:
        for value in list(vars(namespace).values()):
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if isinstance(value, property):
                value = value.fget
            if getattr(value, "__module__", None) != module.__name__ or id(value) in seen:
                continue
            # A class may name another (Site.requestFactory): each once.
            seen.add(id(value))
            if isinstance(value, type):
                instrument(value, module)
            elif isinstance(getattr(value, "__code__", None), types.CodeType):
                atheris.instrument_func(value)

    for module in modules:
        instrument(module, module)


def command(spec, path: str) -> str:
    """
    The shell command that runs this harness again: libFuzzer's C{-merge}
    runs C{argv[0]} through the shell, and a module run with C{python -m}
    is not a program of its own.
    """
    target = f"-m {spec.name}" if spec is not None else shlex.quote(path)
    return f"{shlex.quote(sys.executable)} {target}"


def split(data: bytes, extra: int = 0) -> Tuple[int, List[bytes]]:
    """
    The harness's choices and the pieces of the stream to deliver.

    The first byte is the control byte: its low 3 bits say how many of the
    bytes after it are piece sizes (each size is the byte's value plus
    one, and the sizes repeat until the stream is used up; none means one
    piece), its high 5 bits are the harness's own choices.  C{extra}
    more bytes of choices may follow it (bits 5 and up of the choices),
    then the sizes; the rest of the input is the stream.
    """
    if not data:
        return 0, []
    control = data[0]
    choices = control >> 3
    for i, b in enumerate(data[1 : 1 + extra]):
        choices |= b << (5 + 8 * i)
    rest = data[1 + extra :]
    count = control & 7
    sizes = [b + 1 for b in rest[:count]]
    stream = rest[count:]
    if not sizes:
        return choices, [stream] if stream else []
    pieces = []
    at = 0
    i = 0
    while at < len(stream):
        size = sizes[i % len(sizes)]
        pieces.append(stream[at : at + size])
        at += size
        i += 1
    return choices, pieces


def join(choices: int, sizes: List[int], stream: bytes, extra: int = 0) -> bytes:
    """
    The input that L{split} reads as C{choices}, pieces of C{sizes} (at
    most 7, each 1-256) and C{stream}: for writing seeds.
    """
    assert 0 <= choices < 1 << (5 + 8 * extra) and len(sizes) <= 7
    control = bytes([(choices & 31) << 3 | len(sizes)])
    more = bytes((choices >> (5 + 8 * i)) & 255 for i in range(extra))
    return control + more + bytes(s - 1 for s in sizes) + stream


class LoggedErrors:
    """
    While entered, collect the events logged as errors (with a failure,
    or at level error or critical); L{check} fails if there were any.
    """

    def __enter__(self) -> "LoggedErrors":
        from twisted.logger import globalLogPublisher

        self.events: list = []
        globalLogPublisher.addObserver(self._observe)
        return self

    def __exit__(self, *exc_info) -> None:
        from twisted.logger import globalLogPublisher

        globalLogPublisher.removeObserver(self._observe)

    def _observe(self, event) -> None:
        from twisted.logger import LogLevel

        if event.get("log_failure") is not None or event.get("log_level") in (
            LogLevel.error,
            LogLevel.critical,
        ):
            self.events.append(event)

    def check(self) -> None:
        if not self.events:
            return
        from twisted.logger import formatEvent

        event = self.events[0]
        message = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            message += "\n" + failure.getTraceback()
        raise AssertionError(f"{len(self.events)} error(s) logged; the first: {message}")


def corpus(target: str) -> List[str]:
    """
    The files of one target's committed corpus, by name.
    """
    folder = os.path.join(CORPUS, target)
    if not os.path.isdir(folder):
        return []
    return sorted(
        os.path.join(folder, name)
        for name in os.listdir(folder)
        if not name.startswith(".")
    )
