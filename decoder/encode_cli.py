"""ctd-encoder's command line: encrypt, decrypt and inspect OCI images (layouts and archives).

Parses the arguments, loads recipients and --key files, runs `encode` and prints: result
lines on stdout, a progress line on stderr while a long layer streams (only when stderr is a
terminal), warnings and errors on stderr. Any DecoderError (argument errors included) is one
line `ctd-encoder: <message>` and exit status 1. Set CTD_ENCODER_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn, TextIO

from decoder import __version__
from decoder.cli import escape_controls, fill_closed_std_fds, one_line
from decoder.errors import DecoderError, OutputError, UsageError

PROGRAM = "ctd-encoder"
_MIB = 1024 * 1024

DESCRIPTION = """\
Encrypt, decrypt and inspect OCI images with ocicrypt's layer encryption, as skopeo,
containerd's imgcrypt (ctr-enc, ctd-decoder) and nerdctl read and write it.

images:  oci:DIR[:REF]          an OCI image layout (REF: the image's ref name in index.json;
                                without it, the layout's only image)
         oci-archive:FILE[:REF] the same as a tar file
"""

RECIPIENT_HELP = (
    "who can decrypt: jwe:FILE (RSA or EC public key as PEM, DER or JWK, or an x509 "
    "certificate) or pkcs7:CERT (x509 certificate with an RSA key); repeatable"
)
KEY_HELP = (
    "a private key (PEM, DER or JWK; certificates for pkcs7 too), with an optional password "
    "as :PASSWORD, :pass=PASSWORD, :file=PASSWORD-FILE or :fd=N; repeatable"
)
LAYER_HELP = "a layer index, negative counting from the top (-1 is the topmost); default all"
PLATFORM_HELP = "only the manifests of this platform (OS/ARCH[/VARIANT]) change; repeatable"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROGRAM, description=DESCRIPTION,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROGRAM} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=_Parser)

    encrypt = commands.add_parser(
        "encrypt", help="encrypt layers for recipients (or add recipients to encrypted ones)",
        description="Encrypt the layers of SRC for the recipients and write the image to DST. "
        "A layer that is already encrypted keeps its ciphertext and gets the new recipients "
        "added; that needs a --key that opens it.",
    )
    encrypt.add_argument("--recipient", action="append", required=True, metavar="SPEC",
                         help=RECIPIENT_HELP)
    _common(encrypt)

    decrypt = commands.add_parser(
        "decrypt", help="decrypt layers back to their plain media types",
        description="Decrypt the encrypted layers of SRC with the keys and write the image to "
        "DST; each layer is checked against the digest in its private options.",
    )
    _common(decrypt, key_required=True)
    decrypt.add_argument(
        "--accept-digest-mismatch", action="store_true",
        help="keep a layer whose HMAC verified but whose content differs from the digest in "
        "its private options (skopeo records the source blob's digest when it recompresses)",
    )

    info = commands.add_parser(
        "layerinfo", help="list layers, their encryption and recipients",
        description="For each platform and layer: index, digest, size, media type, key-wrap "
        "schemes and recipients; with --key, which of the keys open each layer.",
    )
    info.add_argument("source", metavar="SRC")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--key", action="append", default=[], metavar="KEY[:PASSWORD]",
                      help=KEY_HELP)
    info.add_argument("--recipient", action="append", default=[], metavar="jwe:FILE",
                      help="a public key (or certificate) to name JWE recipients by: layers "
                      "we encrypt carry each recipient key's thumbprint as kid")
    info.add_argument("--platform", action="append", default=[], metavar="OS/ARCH[/VARIANT]",
                      help="only these platforms")
    payload = commands.add_parser(
        "payload", help="write the fd-3 payload containerd would give ctd-decoder for a layer",
        description="Write the payload (a protobuf Any holding the layer's descriptor) that "
        "containerd passes ctd-decoder on fd 3, so that the decoder can be run by hand: "
        "ctd-decoder --decryption-keys-path DIR < BLOB 3< PAYLOAD > LAYER. The layer's blob "
        "is named on stderr.",
    )
    payload.add_argument("source", metavar="SRC")
    payload.add_argument("--layer", type=int, required=True, metavar="N",
                         help="the layer, by index (negative counts from the top: -1 is the "
                         "topmost)")
    payload.add_argument("--platform", action="append", default=[],
                         metavar="OS/ARCH[/VARIANT]", help="the platform, when SRC has several")
    payload.add_argument("--output", "-o", metavar="FILE",
                         help="write it to FILE (default: stdout, unless it is a terminal)")
    return parser


def _common(sub: argparse.ArgumentParser, key_required: bool = False) -> None:
    sub.add_argument("--key", action="append", default=[], required=key_required,
                     metavar="KEY[:PASSWORD]", help=KEY_HELP)
    sub.add_argument("--layer", action="append", default=[], type=int, metavar="N",
                     help=LAYER_HELP)
    sub.add_argument("--platform", action="append", default=[], metavar="OS/ARCH[/VARIANT]",
                     help=PLATFORM_HELP)
    sub.add_argument("source", metavar="SRC")
    sub.add_argument("destination", metavar="DST")


class TerminalReporter:
    """Result lines on stdout; a one-line progress display on stderr when it is a terminal,
    drawn only once a layer has taken more than half a second."""

    DELAY = 0.5
    INTERVAL = 0.1

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out = out
        self.err = err
        self.tty = err.isatty()
        self.drawn = False

    def start(self, label: str, total: int) -> Callable[[int], None] | None:
        if not self.tty:
            return None
        label = escape_controls(label)  # it names a platform, from the image's own JSON
        began = time.monotonic()
        shown = [0.0]

        def update(done: int) -> None:
            now = time.monotonic()
            if now - began < self.DELAY or (now - shown[0] < self.INTERVAL and done < total):
                return
            shown[0] = now
            percent = 100 * done // total if total else 100
            rate = done / _MIB / max(now - began, 1e-6)
            self.err.write(f"\r{label}: {percent:3d}% of {total / _MIB:.0f} MiB, "
                           f"{rate:.0f} MiB/s\x1b[K")
            self.err.flush()
            self.drawn = True

        return update

    def finish(self) -> None:
        if self.drawn:
            self.err.write("\r\x1b[K")
            self.err.flush()
            self.drawn = False

    def say(self, text: str) -> None:
        """A result line (or lines), written whole or raising BrokenPipeError: straight to
        the file descriptor when there is one, since a buffered stream can lose the error
        of a pipe closed after a partial write and exit 0 with its output cut short."""
        data = "\n".join(escape_controls(line) for line in text.split("\n")) + "\n"
        if self.out is None:  # fd 1 was closed when the program started
            raise OutputError("cannot write the results: stdout (fd 1) is closed")
        try:
            fd = self.out.fileno()
        except (AttributeError, OSError, ValueError):  # not a real file (tests: captured)
            self.out.write(data)
            self.out.flush()
            return
        self.out.flush()
        view = memoryview(data.encode(self.out.encoding or "utf-8", "backslashreplace"))
        while view:
            view = view[os.write(fd, view):]

    def warn(self, text: str) -> None:
        self.err.write(f"{PROGRAM}: warning: {one_line(text)}\n")
        self.err.flush()


def format_layer_info(info: dict[str, Any]) -> str:
    """The layerinfo table as text."""
    lines = [f"{info['image']} ({info['digest']})"]
    for manifest in info["manifests"]:
        lines.append(f"platform {manifest['platform'] or 'unknown'}, manifest "
                     f"{manifest['manifest']}")
        lines.append("   #  DIGEST" + " " * 66 + "SIZE        MEDIA TYPE")
        for layer in manifest["layers"]:
            lines.append(f"  {layer['index']:2d}  {layer['digest']:<72}{_size(layer['size']):>10}"
                         f"  {layer['mediaType']}")
            if not layer["encrypted"]:
                lines.append("      not encrypted")
                continue
            for recipient in layer["recipients"]:
                lines.append(f"      {recipient['scheme']}: {recipient['description']}")
            if "openedBy" in layer:
                opened = ", ".join(layer["openedBy"]) or "none of the given keys"
                lines.append(f"      opened by: {opened}")
    return "\n".join(escape_controls(line) for line in lines)


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def run(argv: list[str], reporter: TerminalReporter) -> int:
    from decoder import encode, ocilayout

    args = build_parser().parse_args(argv)
    platforms = tuple(encode.parse_platform(p) for p in args.platform)
    if args.command == "payload":
        return _write_payload(args, platforms)
    ring = encode.load_keys(args.key)
    if args.command == "layerinfo":
        known = encode.parse_recipients(args.recipient)
        if any(r.scheme != "jwe" for r in known):
            raise UsageError("layerinfo --recipient takes jwe: keys; PKCS7 recipients are "
                             "listed by certificate issuer and serial already")
        info = encode.layer_info(ocilayout.parse_location(args.source), ring, list(platforms),
                                 known)
        reporter.say(json.dumps(info, indent=2) if args.json else format_layer_info(info))
        return 0
    source = ocilayout.parse_location(args.source)
    destination = ocilayout.parse_location(args.destination)
    ocilayout.LATE_SIGNALS.clear()
    ocilayout.COMMITTED.clear()
    recipients = encode.parse_recipients(getattr(args, "recipient", None) or [], reporter)
    request = encode.Request(
        command=args.command,
        source=source,
        destination=destination,
        recipients=recipients,
        ring=ring,
        layers=tuple(args.layer),
        platforms=platforms,
        accept_digest_mismatch=getattr(args, "accept_digest_mismatch", False),
    )
    encode.run(request, reporter)
    for number in ocilayout.LATE_SIGNALS:
        reporter.warn(f"{signal.Signals(number).name} came while {destination} was being "
                      "saved, too late to stop it: the image was written in full")
    return 0


def _write_payload(args: argparse.Namespace, platforms: tuple[Any, ...]) -> int:
    from decoder import encode, ocilayout
    from decoder.payload import encode_payload

    source = ocilayout.parse_location(args.source)
    descriptor, label, blob = encode.layer_descriptor(source, list(platforms), args.layer)
    data = encode_payload(descriptor)
    if args.output is None:
        try:
            if os.isatty(1):
                raise UsageError("the payload is binary: redirect stdout to a file, or give "
                                 "-o FILE")
            view = memoryview(data)
            while view:
                view = view[os.write(1, view):]
        except OSError as e:
            raise UsageError(f"cannot write the payload to stdout: {e.strerror}; give -o FILE"
                             ) from e
    else:
        try:
            with open(args.output, "wb") as f:
                f.write(data)
        except OSError as e:
            raise UsageError(f"cannot write {args.output}: {e.strerror}") from e
    sys.stderr.write(f"{label}: {descriptor.get('mediaType')}, blob {blob}\n")
    return 0


def _what_was_written() -> str:
    from decoder import ocilayout

    if ocilayout.COMMITTED:  # the signal came after the commit, while results were printed
        return f"{ocilayout.COMMITTED[-1]} had been written in full (its report is cut short)"
    return "nothing was written"


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwinds like KeyboardInterrupt, so the same cleanup runs
    (a partial DST is removed) before ctd-encoder exits with 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _terminate(signum: int, _frame: object) -> None:
    # a second signal must not interrupt the cleanup the first one started
    for other in (*_STOP_SIGNALS, signal.SIGINT):
        signal.signal(other, signal.SIG_IGN)
    raise Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ctd-encoder console script."""
    reporter = TerminalReporter(sys.stdout, sys.stderr)
    if threading.current_thread() is not threading.main_thread():
        return _main(argv, reporter)  # signal handlers can only be set in the main thread
    previous = {s: signal.getsignal(s) for s in (*_STOP_SIGNALS, signal.SIGINT)}
    for stop in _STOP_SIGNALS:
        if previous[stop] is not signal.SIG_IGN:  # nohup, or a parent that ignores them
            signal.signal(stop, _terminate)
    try:
        return _main(argv, reporter)
    finally:
        for number, handler in previous.items():
            if handler is not None:
                signal.signal(number, handler)


def console_main() -> NoReturn:
    """The ctd-encoder console script: main(), then out without the interpreter's teardown,
    during which a late SIGINT or SIGTERM would turn a finished, reported run into a death by
    signal (its handlers are reset to the defaults there)."""
    _guard_closed_std_streams()
    code = main()
    for number in (*_STOP_SIGNALS, signal.SIGINT):
        signal.signal(number, signal.SIG_IGN)  # the run is over, its result reported
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # closed at start: nothing was written through it
            continue
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 1
    os._exit(code)


def _guard_closed_std_streams() -> None:
    """Fds 0-2 closed at start get /dev/null, so no file the run opens takes their number;
    stdout's is read-only, so what is written there fails (payload) and result lines are
    refused (TerminalReporter.say) rather than lost. A closed stderr loses only messages."""
    closed = fill_closed_std_fds()
    if 1 in closed:
        try:
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 1)
            os.close(null)
        except OSError:
            pass
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # for the whole run


def _main(argv: list[str] | None, reporter: TerminalReporter) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv, reporter)
    except DecoderError as e:
        reporter.finish()
        if os.environ.get("CTD_ENCODER_DEBUG") == "1":
            raise
        sys.stderr.write(f"{PROGRAM}: {one_line(str(e))}\n")
        return 1
    except KeyboardInterrupt:
        reporter.finish()
        sys.stderr.write(f"{PROGRAM}: interrupted; {_what_was_written()}\n")
        return 130
    except Terminated as e:
        reporter.finish()
        name = signal.Signals(e.signum).name
        sys.stderr.write(f"{PROGRAM}: terminated by {name}; {_what_was_written()}\n")
        return 128 + e.signum
    except BrokenPipeError:
        # the reader of stdout went away (`ctd-encoder layerinfo | head`): exit 1 quietly, as
        # cat does, with stdout pointed at /dev/null so the interpreter's flush at exit
        # finds nothing to complain about
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1


if __name__ == "__main__":
    console_main()
