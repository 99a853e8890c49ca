"""
Fuzz the settings: the bytes are a TOML config file (read by
L{loadConfig}, as C{--config} and a reload read it), or a command line
for the twistd plugin's L{Options}.

The first byte chooses: even, the rest is the file; odd, the rest is the
command line, its arguments separated by NUL (an argument cannot hold
one), decoded as Python decodes C{sys.argv}.

Invariant: a mistake is a L{ConfigError} (from the file) or a
L{SystemExit} with one line starting with C{rrbalancer: } (from the
command line), never another exception; C{--help}, C{--version} and a
C{--check} that passes exit with status 0.  Everything runs in an empty
folder of its own.

Inputs naming special files (devices, /proc, /sys, /run, /tmp, and C{..}
to reach them) are skipped: reading C{/dev/zero} as a config file would
never end, and it is not what is tested here.  So are command lines with
Twisted's hidden C{--_shell-completion}.

Run it as a fuzzer with C{tests/fuzz/run.sh config}.
"""

import contextlib
import io
import os
import sys
import tempfile

from tests.fuzz._common import command, instrumentModules, instrumented

with instrumented(__name__):
    from rrbalancer.config import ConfigError, loadConfig
    from rrbalancer.tap import Options

_SPECIAL = ("dev", "proc", "sys", "run", "tmp", "..", "~")

def _special(text: str) -> bool:
    return any(word in text for word in _SPECIAL)


@contextlib.contextmanager
def _inEmptyFolder():
    """
    Work in a new empty folder, removed after: one per input, since a
    fuzzer ends its process without running atexit handlers.
    """
    previous = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="rrbalancer-fuzz-config-") as folder:
        os.chdir(folder)
        try:
            yield folder
        finally:
            os.chdir(previous)


def _oneLine(message: str, what: str) -> None:
    assert message, f"{what} with an empty message"
    assert "\n" not in message and "\r" not in message, f"{what} of several lines: {message!r}"


def checkFile(text: bytes) -> None:
    if _special(text.decode("utf-8", "replace")) or b"\\" in text:
        # A TOML escape could spell a special name; not worth decoding.
        return
    with _inEmptyFolder() as folder:
        path = os.path.join(folder, "balancer.toml")
        with open(path, "wb") as f:
            f.write(text)
        try:
            loadConfig(path)
        except ConfigError as e:
            _oneLine(str(e), "ConfigError")
        except Exception as e:
            raise AssertionError(f"loadConfig raised {e!r} for {text!r}") from e


def checkCommandLine(argv) -> None:
    if any(_special(arg) for arg in argv):
        return
    if any(arg.startswith("--_") for arg in argv):
        # usage.Options's hidden --_shell-completion (and its abbreviations):
        # Twisted's protocol with its zsh completion, not a user's setting.
        return
    out, err = io.StringIO(), io.StringIO()
    with _inEmptyFolder(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            Options().parseOptions(argv)
        except SystemExit as e:
            code = e.code
            if code in (0, None):
                return
            assert isinstance(code, str), f"exit status {code!r} for {argv!r}"
            assert code.startswith("rrbalancer: "), f"{code!r} for {argv!r}"
            _oneLine(code, "SystemExit")
            assert not out.getvalue() and not err.getvalue(), (
                f"printed before exiting: {out.getvalue()!r} {err.getvalue()!r}"
            )
        except Exception as e:
            raise AssertionError(f"Options raised {e!r} for {argv!r}") from e


def check(data: bytes) -> None:
    if not data:
        return
    if data[0] % 2 == 0:
        checkFile(data[1:])
    else:
        argv = [
            arg.decode("utf-8", "surrogateescape") for arg in data[1:].split(b"\x00")
        ]
        checkCommandLine(argv)


if __name__ == "__main__":
    import atheris
    from twisted.python import usage

    instrumentModules(usage)
    sys.argv[0] = command(__spec__, __file__)
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()
