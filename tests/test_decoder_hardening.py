"""ctd-decoder against what an adversarial review threw at it: whole-layer holding and the
spool file, keys of kinds the crypto library does not know, library warnings, links that
leave the key directory, a huge untrusted digest, Go-style boolean flags and JWE recipient
counts spread over many blobs."""

from __future__ import annotations

import base64
import contextlib
import os
import subprocess
from pathlib import Path

import pytest

from decoder import layercipher
from tests.support import (
    JWE_ANNOTATION,
    KEYS,
    encrypt_layer,
    key_dir,
    payload_bytes,
    run_decoder,
    wrap_jwe,
)
from tests.test_cli import args_for, assert_failed, tar_gz_layer

# SubjectPublicKeyInfo for algorithm OID 1.2.3.4: cryptography raises UnsupportedAlgorithm.
UNKNOWN_ALGORITHM_SPKI = bytes.fromhex("300b300506032a030403020001")


def large_layer(tmp_path: Path) -> tuple[bytes, dict[str, object], bytes, list[str]]:
    plaintext = tar_gz_layer(layercipher.FULL_HOLD + 300_000)
    layer = encrypt_layer(plaintext, [KEYS / "rsa2048.pub.pem"])
    return layer.ciphertext, dict(layer.descriptor), plaintext, args_for(
        key_dir(tmp_path, "rsa2048-pkcs8.pem"))


def test_spool_dir_writes_nothing_until_a_large_layer_verifies(tmp_path: Path) -> None:
    ciphertext, descriptor, plaintext, args = large_layer(tmp_path)
    spool = tmp_path / "spool"
    spool.mkdir()
    good = run_decoder(ciphertext, payload_bytes(descriptor), [*args, "--spool-dir", str(spool)])
    assert good.returncode == 0, good.stderr
    assert good.stdout == plaintext
    flipped = bytearray(ciphertext)
    flipped[len(flipped) // 2] ^= 1
    bad = run_decoder(bytes(flipped), payload_bytes(descriptor),
                      [*args, f"--spool-dir={spool}"])
    assert_failed(bad, "HMAC check", "; nothing was written", plaintext=plaintext)
    assert bad.stdout == b"", "with a spool file nothing goes out before the checks"
    without = run_decoder(bytes(flipped), payload_bytes(descriptor), args)
    assert_failed(without, "HMAC check", "the end of the plaintext was withheld",
                  plaintext=plaintext)
    assert len(without.stdout) > layercipher.FULL_HOLD, "without one, a prefix streams out"
    assert list(spool.iterdir()) == [], "the spool file leaves nothing behind"


def test_an_unusable_spool_dir_is_one_clear_error(tmp_path: Path) -> None:
    ciphertext, descriptor, _, args = large_layer(tmp_path)
    result = run_decoder(ciphertext, payload_bytes(descriptor),
                         [*args, "--spool-dir", str(tmp_path / "missing")])
    assert_failed(result, f"cannot create a spool file in --spool-dir {tmp_path / 'missing'}")
    assert result.stdout == b""


def test_a_key_of_an_unknown_algorithm_does_not_stop_the_good_key(tmp_path: Path) -> None:
    plaintext = os.urandom(5000)
    layer = encrypt_layer(plaintext, [KEYS / "ec256.pub.pem"])
    keys = key_dir(tmp_path, "ec256-pkcs8.pem")
    (keys / "aaa-exotic.der").write_bytes(UNKNOWN_ALGORITHM_SPKI)
    (keys / "aaa-exotic.pem").write_text(
        "-----BEGIN PUBLIC KEY-----\n"
        + base64.b64encode(UNKNOWN_ALGORITHM_SPKI).decode() + "\n-----END PUBLIC KEY-----\n")
    result = run_decoder(layer.ciphertext, payload_bytes(layer.descriptor), args_for(keys))
    assert result.returncode == 0, result.stderr
    assert result.stdout == plaintext
    assert "Traceback" not in result.stderr
    other = encrypt_layer(plaintext, [KEYS / "rsa2048.pub.pem"])
    refused = run_decoder(other.ciphertext, payload_bytes(other.descriptor), args_for(keys))
    assert_failed(refused, f"{keys}/aaa-exotic.der (", f"{keys}/aaa-exotic.pem (")


def test_library_warnings_stay_off_stderr(tmp_path: Path) -> None:
    """A certificate with a negative serial makes cryptography warn; stderr stays clean."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
         str(tmp_path / "k.pem"), "-out", str(tmp_path / "neg.pem"), "-subj", "/CN=x",
         "-set_serial", "-5", "-days", "1"], check=True, capture_output=True)
    keys = key_dir(tmp_path, "ec256-pkcs8.pem")
    (keys / "neg.pem").write_bytes((tmp_path / "neg.pem").read_bytes())
    plaintext = os.urandom(3000)
    layer = encrypt_layer(plaintext, [KEYS / "ec256.pub.pem"])
    result = run_decoder(layer.ciphertext, payload_bytes(layer.descriptor), args_for(keys))
    assert result.returncode == 0 and result.stdout == plaintext
    assert result.stderr == "", result.stderr


def test_links_leaving_the_key_directory_are_named_when_no_key_opens(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "k.pem").write_bytes((KEYS / "rsa2048-pkcs8.pem").read_bytes())
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "k.pem").symlink_to(outside / "k.pem")
    (keys / "gone.pem").symlink_to(tmp_path / "no-such-file")
    layer = encrypt_layer(os.urandom(3000), [KEYS / "rsa2048.pub.pem"])
    result = run_decoder(layer.ciphertext, payload_bytes(layer.descriptor), args_for(keys))
    assert_failed(result, f"{keys}/k.pem (link leads outside the key directory)",
                  f"{keys}/gone.pem (dangling link")
    (keys / "inside.pem").write_bytes((KEYS / "rsa2048-pkcs8.pem").read_bytes())
    opened = run_decoder(layer.ciphertext, payload_bytes(layer.descriptor), args_for(keys))
    assert opened.returncode == 0
    assert opened.stderr == (f"ctd-decoder: warning: skipped {keys}/k.pem: link leads outside "
                             "the key directory\n")


def test_a_huge_untrusted_digest_does_not_push_out_the_node_facts(tmp_path: Path) -> None:
    layer = encrypt_layer(os.urandom(3000), [KEYS / "rsa2048.pub.pem"])
    descriptor = {**layer.descriptor, "digest": "sha256:" + "f" * 9000}
    keys = key_dir(tmp_path, "ec256-pkcs8.pem")
    result = run_decoder(layer.ciphertext, payload_bytes(descriptor), args_for(keys))
    assert_failed(result, "no key opens layer sha256:ffff", "...; keys tried: ",
                  f"{keys}/ec256-pkcs8.pem (EC P-256)", "the layer is wrapped for: JWE")
    assert len(result.stderr) < 1000


@pytest.mark.parametrize(("flag", "accepted"), [
    ("--accept-digest-mismatch", True), ("--accept-digest-mismatch=true", True),
    ("-accept-digest-mismatch=1", True), ("--accept-digest-mismatch=false", False),
])
def test_boolean_flags_take_go_style_values(tmp_path: Path, flag: str, accepted: bool) -> None:
    plaintext = os.urandom(3000)
    layer = encrypt_layer(plaintext, [KEYS / "ec256.pub.pem"],
                          private={"digest": "sha256:" + "0" * 64})
    args = [*args_for(key_dir(tmp_path, "ec256-pkcs8.pem")), flag]
    result = run_decoder(layer.ciphertext, payload_bytes(layer.descriptor), args)
    if accepted:
        assert result.returncode == 0 and result.stdout == plaintext
        assert "accepted because the HMAC verified" in result.stderr
    else:
        assert_failed(result, "does not match the sha256 digest", plaintext=plaintext)


def test_a_boolean_flag_with_another_value_is_refused(tmp_path: Path) -> None:
    result = run_decoder(b"", None, ["--accept-digest-mismatch=maybe"])
    assert_failed(result, "option --accept-digest-mismatch takes no value or true/false")
    assert result.stdout == b""


def test_recipients_are_capped_over_all_blobs_of_a_layer(tmp_path: Path) -> None:
    """Many comma-joined JWEs cannot multiply the key attempts: 256 recipients per layer, so
    a recipient behind 280 others is not reached even by the key that would open it."""
    plaintext = os.urandom(3000)
    layer = encrypt_layer(plaintext, [KEYS / "rsa2048.pub.pem"])
    decoy = wrap_jwe(b"{}", [KEYS / "rsa4096.pub.pem"] * 40)  # 40 RSA recipients, other key
    blobs = [base64.b64encode(decoy).decode()] * 7
    annotations = dict(layer.descriptor["annotations"])  # type: ignore[call-overload]
    keys = key_dir(tmp_path, "rsa2048-pkcs8.pem")
    annotations[JWE_ANNOTATION] = ",".join([*blobs[:1], annotations[JWE_ANNOTATION]])
    reachable = {**layer.descriptor, "annotations": annotations}
    opened = run_decoder(layer.ciphertext, payload_bytes(reachable), args_for(keys))
    assert opened.returncode == 0 and opened.stdout == plaintext, opened.stderr
    annotations[JWE_ANNOTATION] = ",".join([*blobs, annotations[JWE_ANNOTATION].split(",")[-1]])
    beyond = {**layer.descriptor, "annotations": annotations}
    result = run_decoder(layer.ciphertext, payload_bytes(beyond), args_for(keys))
    assert_failed(result, "no key opens layer", "JWE 7 has 40 recipients; only the first 16 "
                  "were tried (256 per layer)")


def wrapped(shell_redirect: str) -> list[str]:
    """The decoder started through a shell that applies a redirection first."""
    from tests.support import decoder_command

    return ["/bin/bash", "-c", f'exec "$@" {shell_redirect}', "sh", *decoder_command()]


@pytest.mark.parametrize(("redirect", "named"), [(">&-", "stdout (fd 1)"),
                                                 ("<&-", "stdin (fd 0)")])
def test_a_closed_stdin_or_stdout_is_named_and_no_file_takes_its_place(
    redirect: str, named: str, tmp_path: Path
) -> None:
    # Closed, the fd would go to the next file opened: the spool, which was then copied
    # onto itself, or a key file read as the ciphertext.
    ciphertext, descriptor, _, args = large_layer(tmp_path)
    spool = tmp_path / "spool"
    spool.mkdir()
    result = run_decoder(ciphertext, payload_bytes(descriptor),
                         [*args, "--spool-dir", str(spool)], command=wrapped(redirect))
    assert_failed(result, named, "is closed; nothing was written")
    assert list(spool.iterdir()) == []


def test_a_closed_stderr_loses_the_messages_not_the_layer(tmp_path: Path) -> None:
    ciphertext, descriptor, plaintext, args = large_layer(tmp_path)
    result = run_decoder(ciphertext, payload_bytes(descriptor), args, command=wrapped("2>&-"))
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == plaintext


def start_with_payload(
    command: list[str], args: list[str], payload: bytes
) -> subprocess.Popen[bytes]:
    """The decoder with its payload on fd 3 and pipes for stdin, stdout and stderr."""
    read_end, write_end = os.pipe()
    os.write(write_end, payload)  # small: fits in the pipe
    os.close(write_end)
    env = {k: v for k, v in os.environ.items() if k != "CTD_DECODER_DEBUG"}
    try:
        return subprocess.Popen(
            ["/bin/bash", "-c", f'exec 3<&{read_end} {read_end}<&-; exec "$@"', "sh",
             *command, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(read_end,), env=env,
        )
    finally:
        os.close(read_end)


def test_sigint_is_one_line_and_exit_130(tmp_path: Path) -> None:
    import signal
    import threading

    from tests.support import decoder_command

    ciphertext, descriptor, _, args = large_layer(tmp_path)
    process = start_with_payload(decoder_command(), args, payload_bytes(descriptor))
    assert process.stdin is not None and process.stdout is not None
    stdin = process.stdin

    def feed() -> None:  # 2 MiB, from a thread: the decoder's stdout may fill first
        try:
            stdin.write(ciphertext[: 2 << 20])
            stdin.flush()
        except BrokenPipeError:  # it stopped reading: interrupted
            pass

    feeder = threading.Thread(target=feed)
    feeder.start()
    assert process.stdout.read(1), "the decoder is in its loop, releasing"
    process.send_signal(signal.SIGINT)
    stdout_rest = process.stdout.read()
    feeder.join()
    with contextlib.suppress(BrokenPipeError):
        stdin.close()
    stderr = process.stderr.read() if process.stderr else b""
    process.wait(timeout=60)
    assert len(stdout_rest) < len(ciphertext)
    assert process.returncode == 130
    lines = stderr.decode().splitlines()
    assert lines == ["ctd-decoder: interrupted (SIGINT); the layer was not written in full"]


def test_non_blocking_stdin_and_stdout_are_waited_on(tmp_path: Path) -> None:
    # Whoever starts the decoder may hand it pipes in O_NONBLOCK mode: EAGAIN means wait.
    import sys
    import threading
    import time

    ciphertext, descriptor, plaintext, args = large_layer(tmp_path)
    set_nonblocking = (
        "import fcntl, os, sys\n"
        "for fd in (0, 1):\n"
        "    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'decoder', *sys.argv[1:]])\n"
    )
    process = start_with_payload([sys.executable, "-c", set_nonblocking], args,
                                 payload_bytes(descriptor))
    assert process.stdin is not None and process.stdout is not None

    def feed_slowly() -> None:
        assert process.stdin is not None
        for start in range(0, len(ciphertext), 512 * 1024):
            process.stdin.write(ciphertext[start : start + 512 * 1024])
            process.stdin.flush()
            time.sleep(0.02)  # the decoder finds stdin empty: EAGAIN
        process.stdin.close()

    feeder = threading.Thread(target=feed_slowly)
    feeder.start()
    out = bytearray()
    while chunk := process.stdout.read(256 * 1024):
        out += chunk
        time.sleep(0.005)  # and stdout full: EAGAIN
    feeder.join()
    stderr = process.stderr.read() if process.stderr else b""
    assert process.wait(timeout=60) == 0, stderr
    assert bytes(out) == plaintext
