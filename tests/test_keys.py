"""Key sources: every encoding an operator may drop in, stray files, symlinked directories."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from decoder import keys
from decoder.errors import KeyLoadError
from decoder.keys import load_keyring
from tests.support import KEYS


@pytest.mark.parametrize(
    ("name", "description"),
    [
        ("rsa2048-pkcs1.pem", "RSA 2048"),
        ("rsa2048-pkcs8.pem", "RSA 2048"),
        ("rsa2048-pkcs1.der", "RSA 2048"),
        ("rsa2048-pkcs8.der", "RSA 2048"),
        ("rsa4096-pkcs8.pem", "RSA 4096"),
        ("rsa2048.jwk.json", "RSA 2048"),
        ("ec256-sec1.pem", "EC P-256"),
        ("ec256-pkcs8.pem", "EC P-256"),
        ("ec256-sec1.der", "EC P-256"),
        ("ec384-sec1.pem", "EC P-384"),
        ("ec384-sec1.der", "EC P-384"),
        ("ec521-sec1.pem", "EC P-521"),
        ("ec521-pkcs8.pem", "EC P-521"),
        ("ec256.jwk.json", "EC P-256"),
    ],
)
def test_private_key_encodings(name: str, description: str, tmp_path: Path) -> None:
    (tmp_path / name).write_bytes((KEYS / name).read_bytes())
    ring = load_keyring([str(tmp_path)], {})
    assert [k.description for k in ring.private_keys] == [description]
    assert ring.skipped == []


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("rsa2048.pub.pem", "public key"),
        ("ec256.pub.pem", "public key"),
        ("rsa2048.pub.der", "public key"),
        ("ec256.pub.der", "public key"),
        ("rsa2048.pub.jwk.json", "public JWK"),
        ("rsa2048-pkcs8-encrypted.pem", "no password"),
        ("rsa2048-legacy-encrypted.pem", "no password"),
        ("ed25519.pem", "not supported"),
    ],
)
def test_unusable_key_files_are_skipped_with_reason(name: str, reason: str, tmp_path: Path) -> None:
    (tmp_path / name).write_bytes((KEYS / name).read_bytes())
    ring = load_keyring([str(tmp_path)], {})
    assert ring.private_keys == []
    assert len(ring.skipped) == 1 and reason in ring.skipped[0][1]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (b"\n", "empty file"),
        (b"# keys for this node live here\n", "not a private key"),
        (
            b"-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nxyz\n-----END PGP PRIVATE KEY BLOCK-----\n",
            "OpenPGP",
        ),
        (b"\x95\x01\x0d\x04abc", "OpenPGP"),
        (b"pkcs11:\n  uri: pkcs11:token=x\n", "PKCS#11"),
        (b"0\x82garbage", "unreadable DER"),
        (b'{"hello": "world"}', "not a JWK"),
        (b"-----BEGIN PRIVATE KEY-----\nnotbase64\n-----END PRIVATE KEY-----\n", "malformed"),
    ],
)
def test_stray_files(content: bytes, reason: str, tmp_path: Path) -> None:
    (tmp_path / "stray").write_bytes(content)
    ring = load_keyring([str(tmp_path)], {})
    assert ring.private_keys == []
    assert ring.skipped[0][0].endswith("stray") and reason in ring.skipped[0][1]


@pytest.mark.parametrize("name", ["rsa2048-pkcs8-encrypted.pem", "rsa2048-legacy-encrypted.pem"])
def test_password_sidecar(name: str, tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_bytes((KEYS / name).read_bytes())
    (tmp_path / "key.pem.password").write_bytes(b"s3cret\n")
    ring = load_keyring([str(tmp_path)], {})
    assert [k.description for k in ring.private_keys] == ["RSA 2048"]
    assert ring.skipped == []


def test_wrong_password_is_reported(tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_bytes((KEYS / "rsa2048-pkcs8-encrypted.pem").read_bytes())
    (tmp_path / "key.pem.password").write_bytes(b"nope")
    ring = load_keyring([str(tmp_path)], {})
    assert ring.private_keys == []
    assert "password is wrong" in ring.skipped[0][1]


def test_a_missing_password_names_the_file_to_put_it_in(tmp_path: Path) -> None:
    (tmp_path / "node.pem").write_bytes((KEYS / "rsa2048-pkcs8-encrypted.pem").read_bytes())
    ring = load_keyring([str(tmp_path)], {})
    assert ring.skipped == [(str(tmp_path / "node.pem"), "encrypted private key and no "
                             "password for it (put it in node.pem.password beside it)")]
    payload = load_keyring([], {"privkeys": [(KEYS / "rsa2048-legacy-encrypted.pem").read_bytes()]})
    assert payload.skipped == [("payload key 1", "encrypted private key and no password for it "
                                "(privkeys-passwords has none for it)")]


def test_a_password_beside_a_link_to_the_key(tmp_path: Path) -> None:
    """A `current.pem` link to a versioned key takes `current.pem.password` beside the link."""
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "key.pem").write_bytes((KEYS / "rsa2048-pkcs8-encrypted.pem").read_bytes())
    (tmp_path / "current.pem").symlink_to("v2/key.pem")
    (tmp_path / "current.pem.password").write_bytes(b"s3cret\n")
    ring = load_keyring([str(tmp_path)], {})
    assert [k.description for k in ring.private_keys] == ["RSA 2048"]
    assert ring.skipped == []


@pytest.mark.parametrize("right_beside", ["link", "key"])
def test_a_link_and_its_key_each_with_a_password_file(right_beside: str, tmp_path: Path) -> None:
    """Whichever name sorts first, the right password is found; a wrong one names its file."""
    (tmp_path / "z-real").mkdir()
    (tmp_path / "z-real" / "key.pem").write_bytes(
        (KEYS / "rsa2048-pkcs8-encrypted.pem").read_bytes())
    (tmp_path / "link.pem").symlink_to("z-real/key.pem")
    right, wrong = ("link.pem.password", "z-real/key.pem.password")[:: 1 if right_beside ==
                                                                      "link" else -1]
    (tmp_path / right).write_bytes(b"s3cret\n")
    (tmp_path / wrong).write_bytes(b"nope\n")
    ring = load_keyring([str(tmp_path)], {})
    assert [k.description for k in ring.private_keys] == ["RSA 2048"]
    (tmp_path / right).write_bytes(b"also wrong\n")
    ring = load_keyring([str(tmp_path)], {})
    assert ring.private_keys == []
    ((source, reason),) = ring.skipped
    assert source == str(tmp_path / "link.pem")
    assert reason.startswith("encrypted private key and its password is wrong (from ")
    assert str(tmp_path / "link.pem.password") in reason
    assert str(tmp_path / "z-real" / "key.pem.password") in reason


def test_a_certificate_and_encrypted_key_bundle_tries_every_password_file(
    tmp_path: Path
) -> None:
    """The certificate in the file must not make a wrong password look like success."""
    bundle = (KEYS / "rsa2048.cert.pem").read_bytes() + (
        KEYS / "rsa2048-pkcs8-encrypted.pem").read_bytes()
    (tmp_path / "key.pem").write_bytes(bundle)
    (tmp_path / "key.pem.password").write_bytes(b"s3cret\n")
    (tmp_path / "a-link").symlink_to("key.pem")  # sorts first, with a wrong password
    (tmp_path / "a-link.password").write_bytes(b"wrong\n")
    ring = load_keyring([str(tmp_path)], {})
    assert [k.description for k in ring.private_keys] == ["RSA 2048"]
    assert len(ring.certificates) == 1, "the certificate once, not once per attempt"


def test_file_link_loops_are_named_and_warned_about(tmp_path: Path) -> None:
    (tmp_path / "loop.pem").symlink_to("loop.pem")
    (tmp_path / "a.pem").symlink_to("b.pem")
    (tmp_path / "b.pem").symlink_to("a.pem")
    (tmp_path / "gone.pem").symlink_to("nowhere.pem")
    ring = load_keyring([str(tmp_path)], {})
    reasons = dict(ring.skipped)
    assert reasons[str(tmp_path / "loop.pem")] == "link loops (it never reaches a file)"
    assert reasons[str(tmp_path / "a.pem")] == "link loops (it never reaches a file)"
    assert reasons[str(tmp_path / "gone.pem")] == "dangling link (its target does not exist)"
    assert sum("link loops" in w for w in ring.warnings) == 3


def test_the_password_of_a_link_that_was_skipped_says_so(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "key.pem").write_bytes((KEYS / "rsa2048-pkcs8-encrypted.pem").read_bytes())
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "mykey.pem").symlink_to(outside / "key.pem")
    (keys / "mykey.pem.password").write_bytes(b"s3cret")
    ring = load_keyring([str(keys)], {})
    assert dict(ring.skipped)[str(keys / "mykey.pem.password")] == (
        f"password file of {keys / 'mykey.pem'}, which was skipped")


def test_a_key_also_named_like_another_file_s_password_is_still_a_key(tmp_path: Path) -> None:
    (tmp_path / "node.pem").write_bytes((KEYS / "rsa2048-pkcs8.pem").read_bytes())
    (tmp_path / "README").write_text("keys for this node\n")
    (tmp_path / "README.password").symlink_to("node.pem")
    ring = load_keyring([str(tmp_path)], {})
    assert [k.description for k in ring.private_keys] == ["RSA 2048"]


def test_orphan_password_file_and_password_for_plain_key(tmp_path: Path) -> None:
    (tmp_path / "a.pem").write_bytes((KEYS / "rsa2048-pkcs1.pem").read_bytes())
    (tmp_path / "a.pem.password").write_bytes(b"unused")
    (tmp_path / "b.pem.password").write_bytes(b"orphan")
    ring = load_keyring([str(tmp_path)], {})
    assert len(ring.private_keys) == 1
    assert ring.skipped == [
        (str(tmp_path / "b.pem.password"), "password file with no key file beside it")
    ]


def test_key_and_certificate_in_one_pem(tmp_path: Path) -> None:
    both = (KEYS / "rsa2048.cert.pem").read_bytes() + (KEYS / "rsa2048-pkcs8.pem").read_bytes()
    (tmp_path / "both.pem").write_bytes(both)
    ring = load_keyring([str(tmp_path)], {})
    assert len(ring.private_keys) == 1 and len(ring.certificates) == 1


def test_recursive_walk_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.pem").write_bytes((KEYS / "ec256-sec1.pem").read_bytes())
    (tmp_path / "a.pem").write_bytes((KEYS / "rsa2048-pkcs1.pem").read_bytes())
    (tmp_path / "c.pem").write_bytes((KEYS / "ec384-sec1.pem").read_bytes())
    ring = load_keyring([str(tmp_path)], {})
    assert [Path(k.source).name for k in ring.private_keys] == ["a.pem", "z.pem", "c.pem"]


def test_kubernetes_secret_volume_layout(tmp_path: Path) -> None:
    # A Secret volume: real files in a timestamped dir, ..data -> it, each key -> ..data/key.
    real = tmp_path / "..2026_12_03_10_00_00.123"
    real.mkdir()
    (real / "key.pem").write_bytes((KEYS / "rsa2048-pkcs8-encrypted.pem").read_bytes())
    (real / "key.pem.password").write_bytes(b"s3cret")
    (tmp_path / "..data").symlink_to(real.name)
    (tmp_path / "key.pem").symlink_to("..data/key.pem")
    (tmp_path / "key.pem.password").symlink_to("..data/key.pem.password")
    ring = load_keyring([str(tmp_path)], {})
    assert [k.source for k in ring.private_keys] == [str(tmp_path / "key.pem")]
    assert ring.skipped == [] and ring.warnings == []


def test_key_directory_itself_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "k.pem").write_bytes((KEYS / "ec521-sec1.pem").read_bytes())
    (tmp_path / "link").symlink_to("real")
    ring = load_keyring([str(tmp_path / "link")], {})
    assert [k.source for k in ring.private_keys] == [str(tmp_path / "link" / "k.pem")]


def test_links_outside_and_loops_are_skipped_with_warnings(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    (tmp_path / "outside.pem").write_bytes((KEYS / "rsa2048-pkcs1.pem").read_bytes())
    (keys / "out.pem").symlink_to(tmp_path / "outside.pem")
    (keys / "loop").symlink_to(".")
    (keys / "dangling").symlink_to("nowhere")
    (keys / "ok.pem").write_bytes((KEYS / "ec256-sec1.pem").read_bytes())
    ring = load_keyring([str(keys)], {})
    assert [Path(k.source).name for k in ring.private_keys] == ["ok.pem"]
    assert any("out.pem" in w and "outside" in w for w in ring.warnings)
    assert any("loop" in w and "loops back" in w for w in ring.warnings)
    assert any(s.endswith("dangling") for s, _ in ring.skipped)


def test_fifo_is_not_opened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    ring = load_keyring([str(tmp_path)], {})
    assert ring.skipped == [(str(tmp_path / "fifo"), "not a regular file")]


def test_unreadable_file_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"0" * (1024 * 1024 + 1))
    ring = load_keyring([str(tmp_path)], {})
    assert "too large" in ring.skipped[0][1]


def test_missing_directory_is_noted_not_fatal(tmp_path: Path) -> None:
    ring = load_keyring(
        [str(tmp_path / "nope")], {"privkeys": [(KEYS / "ec256-sec1.pem").read_bytes()]}
    )
    assert [k.source for k in ring.private_keys] == ["payload key 1"]
    assert "cannot be read" in ring.skipped[0][1]


def test_empty_directory_argument_is_an_error() -> None:
    with pytest.raises(KeyLoadError, match="empty path"):
        load_keyring([""], {})


def test_directory_keys_come_before_payload_keys(tmp_path: Path) -> None:
    (tmp_path / "dir.pem").write_bytes((KEYS / "ec384-sec1.pem").read_bytes())
    params: dict[str, list[bytes | None]] = {
        "privkeys": [
            (KEYS / "rsa2048-legacy-encrypted.pem").read_bytes(),
            (KEYS / "ec256-pkcs8.pem").read_bytes(),
        ],
        "privkeys-passwords": [b"s3cret"],
        "x509s": [(KEYS / "rsa2048.cert.pem").read_bytes()],
    }
    ring = load_keyring([str(tmp_path)], params)
    assert [(k.source, k.description) for k in ring.private_keys] == [
        (str(tmp_path / "dir.pem"), "EC P-384"),
        ("payload key 1", "RSA 2048"),
        ("payload key 2", "EC P-256"),
    ]
    assert [c.source for c in ring.certificates] == ["payload certificate 1"]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("rsa2048-pkcs8-costly-pbkdf2.pem", "3000000 PBKDF2 iterations"),
        ("ec256-pkcs8-costly-scrypt.pem", "scrypt parameters are too costly"),
    ],
)
def test_costly_password_based_keys_are_not_derived(name: str, reason: str, tmp_path: Path) -> None:
    (tmp_path / "k.pem").write_bytes((KEYS / name).read_bytes())
    (tmp_path / "k.pem.password").write_bytes(b"s3cret")
    ring = load_keyring([str(tmp_path)], {})
    assert ring.private_keys == [] and reason in ring.skipped[0][1]


def test_pem_scan_is_linear(tmp_path: Path) -> None:
    (tmp_path / "many-begins").write_bytes(b"-----BEGIN A-----\n" * 50_000)
    (tmp_path / "key.pem").write_bytes((KEYS / "ec256-sec1.pem").read_bytes())
    ring = load_keyring([str(tmp_path)], {})
    assert len(ring.private_keys) == 1
    assert "no complete block" in dict(ring.skipped)[str(tmp_path / "many-begins")]


def test_rsa_jwk_without_primes_is_skipped(tmp_path: Path) -> None:
    import json

    jwk = json.loads((KEYS / "rsa2048.jwk.json").read_text())
    for name in ("p", "q", "dp", "dq", "qi"):
        jwk.pop(name)
    (tmp_path / "k.json").write_text(json.dumps(jwk))
    ring = load_keyring([str(tmp_path)], {})
    assert ring.private_keys == [] and "without its primes" in ring.skipped[0][1]


def test_bom_before_a_jwk(tmp_path: Path) -> None:
    (tmp_path / "k.json").write_bytes(b"\xef\xbb\xbf" + (KEYS / "ec256.jwk.json").read_bytes())
    assert len(load_keyring([str(tmp_path)], {}).private_keys) == 1


def test_directory_aliases_are_walked_once(tmp_path: Path) -> None:
    # 20 levels, each linking twice to the next: 2**20 paths but 20 directories.
    dirs = [tmp_path / f"d{i}" for i in range(20)]
    for d in dirs:
        d.mkdir()
    for here, there in itertools.pairwise(dirs):
        (here / "a").symlink_to(there)
        (here / "b").symlink_to(there)
    (dirs[-1] / "key.pem").write_bytes((KEYS / "ec256-sec1.pem").read_bytes())
    ring = load_keyring([str(tmp_path)], {})
    assert len(ring.private_keys) == 1


def test_deep_trees_and_huge_directories_are_bounded(tmp_path: Path) -> None:
    deep = tmp_path / "deep"
    path = deep
    for _ in range(40):
        path = path / "x"
    path.mkdir(parents=True)
    ring = load_keyring([str(deep)], {})
    assert any("deeper than 16" in reason for _, reason in ring.skipped)
    wide = tmp_path / "wide"
    wide.mkdir()
    for i in range(4100):
        (wide / f"f{i:05d}").write_bytes(b"")
    ring = load_keyring([str(wide)], {})
    assert any("more than 4096 entries" in reason for _, reason in ring.skipped)


def test_key_file_named_like_a_password_file(tmp_path: Path) -> None:
    (tmp_path / "node.password").write_bytes((KEYS / "ec384-sec1.pem").read_bytes())
    assert len(load_keyring([str(tmp_path)], {}).private_keys) == 1


def test_deeply_nested_json_file(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_bytes(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    (tmp_path / "k.pem").write_bytes((KEYS / "ec256-sec1.pem").read_bytes())
    ring = load_keyring([str(tmp_path)], {})
    assert len(ring.private_keys) == 1


def test_private_key_loaders_are_cryptographys_public_ones() -> None:
    from cryptography.hazmat.primitives import serialization

    loaders = keys._private_key_loaders()
    assert loaders.load_pem_private_key is serialization.load_pem_private_key
    assert loaders.load_der_private_key is serialization.load_der_private_key
