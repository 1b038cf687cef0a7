"""ctd-decoder's command line: the arguments containerd passes, stderr and the exit code.

Accepts upstream's flag forms (`--decryption-keys-path DIR`, `--decryption-keys-path=DIR`,
`-decryption-keys-path DIR`), repeatable. Any DecoderError becomes one line on stderr and
exit status 1; stdout carries nothing but plaintext. Set CTD_DECODER_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from decoder import __version__

USAGE = """\
usage: ctd-decoder [--decryption-keys-path DIR]... [--keyprovider-config FILE]
                   [--accept-digest-mismatch] [--spool-dir DIR] [--help] [--version]

Decrypts one ocicrypt-encrypted OCI layer for containerd: ciphertext on stdin, the layer
descriptor in a payload on fd 3, plaintext on stdout.

options:
  --decryption-keys-path DIR  a directory of private keys (walked recursively, symlinks
                              followed; KEY.password beside KEY holds its password)
  --keyprovider-config FILE   key-provider configuration (as OCICRYPT_KEYPROVIDER_CONFIG);
                              accepted for compatibility: key providers are not supported yet
  --accept-digest-mismatch    trust the HMAC alone when the plaintext digest differs from the
                              one in the layer's private options (skopeo records the source
                              blob's digest when it recompresses while encrypting)
  --spool-dir DIR             decrypt into an unnamed file in DIR (which must exist) and
                              write nothing until the layer has verified; costs the layer's
                              size in DIR and containerd's overlap of decryption with
                              unpacking (without it, layers up to 8 MiB are held in memory
                              until verified, larger ones stream)
  --help                      show this help and exit
  --version                   show the version and exit
"""

MAX_MESSAGE_CHARS = 8192


def escape_controls(text: str) -> str:
    """Control characters (from file names, annotations, image contents) as escapes, so they
    cannot move a terminal's cursor or start a line of their own."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def one_line(text: str) -> str:
    """Escape control characters (names and headers come from untrusted input) and cap length,
    so each message stays one line that a terminal or `kubectl describe` shows as written."""
    text = escape_controls(text)
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 20] + " ... (truncated)"
    return text


STDOUT_LINGER_SECONDS = 0.5


def report_failure(message: str) -> None:
    """Make the failure reach the operator: stderr, syslog, and an ordering containerd sees.

    containerd reads the processor's stdout to the end, extracts it, and only then asks
    whether the processor failed; if stdout ends before containerd has reaped us, it
    applies an empty layer and reports a diffID mismatch instead of this message. So a
    child keeps stdout open (and nothing else) a little past our exit.
    """
    _say(f"ctd-decoder: {message}\n")
    try:
        import syslog

        syslog.openlog("ctd-decoder", syslog.LOG_PID, syslog.LOG_DAEMON)
        syslog.syslog(syslog.LOG_ERR, message)
    except OSError:
        pass
    _hold_stdout_open()


def _hold_stdout_open() -> None:
    import stat

    try:
        if not stat.S_ISFIFO(os.fstat(1).st_mode) or os.fork() != 0:
            return
    except OSError:
        return
    try:  # the child: only stdout stays open, so containerd's wait for stderr is not delayed
        os.closerange(0, 1)
        os.closerange(2, 1 << 16)
        import time

        time.sleep(STDOUT_LINGER_SECONDS)
    finally:
        os._exit(0)


_VALUE_FLAGS = {"decryption-keys-path", "keyprovider-config", "spool-dir"}
_BOOLEAN_VALUES = {"true": True, "1": True, "t": True, "false": False, "0": False, "f": False}
_SWITCHES = {"accept-digest-mismatch"}


def parse_args(argv: list[str]) -> tuple[dict[str, list[str]], str | None]:
    """Return (values per flag, "help"/"version"/None); raise UsageError on bad arguments."""
    from decoder.errors import UsageError

    values: dict[str, list[str]] = {name: [] for name in _VALUE_FLAGS | _SWITCHES}
    index = 0
    while index < len(argv):
        arg = argv[index]
        index += 1
        if arg in ("-h", "-help", "--help"):
            return values, "help"
        if arg in ("-v", "-V", "-version", "--version"):
            return values, "version"
        if not arg.startswith("-") or arg in ("-", "--"):
            raise UsageError(f"unexpected argument {arg!r} (see --help)")
        name, has_value, value = arg.lstrip("-").partition("=")
        if name in _SWITCHES:
            if has_value and value.lower() not in _BOOLEAN_VALUES:  # Go's flag: -x=true
                raise UsageError(f"option --{name} takes no value or true/false, not {value!r}")
            if _BOOLEAN_VALUES.get(value.lower(), True):
                values[name].append("true")
            else:
                values[name].clear()
            continue
        if name not in _VALUE_FLAGS:
            raise UsageError(f"unknown option {arg.partition('=')[0]!r} (see --help)")
        if not has_value:
            if index >= len(argv):
                raise UsageError(f"option --{name} needs a value")
            value = argv[index]
            index += 1
        values[name].append(value)
    return values, None


def _print(text: str) -> int:
    """Write help or version text; a closed or broken stdout is exit 1, not a traceback."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except (OSError, AttributeError, ValueError):  # AttributeError: fd 1 closed at start-up
        try:  # so the interpreter's own flush at exit finds somewhere to write
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        except OSError:
            pass
        return 1
    return 0


def main() -> NoReturn:
    """Entry point of the ctd-decoder console script and `python -m decoder`: run, then
    leave without the interpreter's teardown of every loaded module (about 10 ms of each
    start, paid once per layer). Nothing is left to finish: plaintext went out through
    os.write, the second thread has been joined, and the std streams are flushed here. A
    traceback (a bug, or CTD_DECODER_DEBUG=1) takes the ordinary way out. The cyclic garbage
    collector is off: a run makes next to no cycles, and its passes over the objects every
    import creates cost about a millisecond of each start."""
    import gc

    gc.disable()
    code = run(sys.argv[1:])
    try:
        sys.stdout.flush()
    except (OSError, ValueError, AttributeError):  # closed or missing at start-up
        code = code or 1
    try:  # a missing stderr (fd 2 closed) loses the messages, not the layer
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass
    os._exit(code)


STD_STREAMS = {0: "stdin (fd 0), where containerd passes the ciphertext",
               1: "stdout (fd 1), where the plaintext goes"}


def fill_closed_std_fds() -> list[int]:
    """Put /dev/null on any of fds 0-2 that are closed, so no file opened later (a key, the
    spool) takes their place and gets written to or read as the layer; return those of 0
    and 1 that were closed."""
    closed = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            closed.append(fd)
    for fd in closed:
        try:
            null = os.open(os.devnull, os.O_RDWR)
        except OSError:
            break
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
    return [fd for fd in closed if fd in STD_STREAMS]


def _say(text: str) -> None:
    """Write to stderr; with fd 2 closed at start-up there is no sys.stderr to write to."""
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


def run(args: list[str]) -> int:
    """ctd-decoder with these arguments; returns the exit status."""
    import warnings

    from decoder.errors import DecoderError

    # Library warnings (a deprecated certificate encoding in a stray file, say) would add
    # lines to the stderr that containerd shows as the error.
    warnings.simplefilter("ignore")
    closed = fill_closed_std_fds()
    try:
        values, action = parse_args(args)
        if action == "help":
            return _print(USAGE)
        if action == "version":
            return _print(f"ctd-decoder {__version__}\n")
        from decoder import decode
        from decoder.errors import OutputError

        if closed:
            raise OutputError(f"{STD_STREAMS[closed[0]]} is closed; nothing was written")
        provider_configs = values["keyprovider-config"]
        options = decode.Options(
            key_directories=values["decryption-keys-path"],
            keyprovider_config=provider_configs[-1]
            if provider_configs
            else os.environ.get("OCICRYPT_KEYPROVIDER_CONFIG"),
            accept_digest_mismatch=bool(values["accept-digest-mismatch"]),
            spool_directory=values["spool-dir"][-1] if values["spool-dir"] else None,
        )
        notes = decode.run(options)
    except DecoderError as e:
        if os.environ.get("CTD_DECODER_DEBUG") == "1":
            raise
        report_failure(one_line(str(e)))
        return 1
    except KeyboardInterrupt:  # SIGINT: by hand, at a terminal
        if os.environ.get("CTD_DECODER_DEBUG") == "1":
            raise
        report_failure("interrupted (SIGINT); the layer was not written in full")
        return 130
    for note in notes:
        _say(f"ctd-decoder: warning: {one_line(note)}\n")
    return 0
