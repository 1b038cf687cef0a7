"""What a decoder run imports. containerd starts ctd-decoder once per layer, so every module
it loads is paid on every pull; the heavy ones below are kept off the common paths on purpose
(docs/performance.md measures the start-up itself)."""

from __future__ import annotations

import sys

import pytest

from tests.support import key_dir, payload_bytes, run_decoder, skopeo_fixture

# Prints the modules loaded by one decoder run on stderr, after the plaintext on stdout.
RUN_AND_LIST_MODULES = (
    "import sys\n"
    "from decoder import cli\n"
    "code = cli.run(sys.argv[1:])\n"
    "sys.stderr.write('MODULES ' + ' '.join(sorted(sys.modules)) + '\\n')\n"
    "raise SystemExit(code)\n"
)

# Never needed to decrypt a JWE-wrapped layer with a PEM key.
NEVER_ON_THE_JWE_PATH = {
    "cryptography.x509",  # certificates: PKCS7 and certificate files only
    "cryptography.hazmat.primitives.serialization",  # its SSH support pulls in dataclasses
    "jwcrypto",
    "google.protobuf",  # the fd-3 Any is read by hand
    "hashlib",  # a second libcrypto; cryptography hashes
    "hmac",
    "threading",  # _thread is enough
    "dataclasses",
    "inspect",
    "tempfile",  # only for a spool directory without O_TMPFILE
    "subprocess",
    "zlib",  # compressed JWE payloads only
    "decoder.encode",
    "decoder.ocilayout",
    "decoder.keywrap.pkcs7",
}


def modules_of_a_run(tmp_path_factory: pytest.TempPathFactory, fixture: str,
                     key: str) -> set[str]:
    ciphertext, descriptor, _ = skopeo_fixture(fixture)
    keys = key_dir(tmp_path_factory.mktemp(fixture), key)
    result = run_decoder(
        ciphertext, payload_bytes(descriptor), ["--decryption-keys-path", str(keys)],
        command=[sys.executable, "-c", RUN_AND_LIST_MODULES],
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout, "the run wrote no plaintext"
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("MODULES ")]
    return set(line.split()[1:])


@pytest.mark.parametrize(
    ("fixture", "key"),
    [("rsa2048", "rsa2048-pkcs8.pem"), ("ec256", "ec256-pkcs8.pem")],
)
def test_a_jwe_layer_loads_none_of_the_heavy_modules(
    tmp_path_factory: pytest.TempPathFactory, fixture: str, key: str
) -> None:
    loaded = modules_of_a_run(tmp_path_factory, fixture, key)
    assert "decoder.keywrap.jwe" in loaded  # the run took the path this test is about
    assert not loaded & NEVER_ON_THE_JWE_PATH, sorted(loaded & NEVER_ON_THE_JWE_PATH)


def test_an_rsa_key_does_not_load_the_ec_module(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    ec_module = "cryptography.hazmat.primitives.asymmetric.ec"
    assert ec_module not in modules_of_a_run(tmp_path_factory, "rsa2048", "rsa2048-pkcs8.pem")
    assert ec_module in modules_of_a_run(tmp_path_factory, "ec256", "ec256-pkcs8.pem")
