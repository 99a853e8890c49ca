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
import shutil
import sys
import tempfile

from tests.fuzz._common import command, instrumentModules, instrumented

with instrumented(__name__):
    from rrbalancer.config import ConfigError, loadConfig
    from rrbalancer.tap import Options

_SPECIAL = ("dev", "proc", "sys", "run", "tmp", "..", "~")

_folder = None


def _workFolder() -> str:
    """
    A folder of this process's own, removed when the process exits.
    """
    global _folder
    if _folder is None:
        import atexit

        _folder = tempfile.mkdtemp(prefix="rrbalancer-fuzz-config-")
        atexit.register(shutil.rmtree, _folder, True)
    return _folder


def _special(text: str) -> bool:
    return any(word in text for word in _SPECIAL)


@contextlib.contextmanager
def _inFolder(folder: str):
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def _oneLine(message: str, what: str) -> None:
    assert message, f"{what} with an empty message"
    assert "\n" not in message and "\r" not in message, f"{what} of several lines: {message!r}"


def checkFile(text: bytes) -> None:
    if _special(text.decode("utf-8", "replace")) or b"\\" in text:
        # A TOML escape could spell a special name; not worth decoding.
        return
    folder = _workFolder()
    path = os.path.join(folder, "balancer.toml")
    with open(path, "wb") as f:
        f.write(text)
    with _inFolder(folder):
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
    with _inFolder(_workFolder()), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
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
