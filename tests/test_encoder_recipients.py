"""ctd-encoder and recipients it already has: a recipient given twice is taken once, one a
layer is already wrapped for is not wrapped for again (a layer that has them all is kept as
it is), layerinfo names JWE recipients by public key, and replacing an image under an
existing ref says so."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jwcrypto import jwk

from tests.layouts import Reader, random_layers, simple_image
from tests.support import ASSETS, KEYS
from tests.test_encoder import JWE_KEYS, Encoder, encoder, ok, refused

__all__ = ["encoder"]  # the fixture, imported for its use here

PKCS7 = ASSETS / "pkcs7"
PKCS7_KEYS = "org.opencontainers.image.enc.keys.pkcs7"


def jwe_kids(descriptor: dict[str, object]) -> list[str]:
    from decoder import keywrap
    from decoder.keywrap import jwe

    annotations = descriptor["annotations"]
    assert isinstance(annotations, dict)
    return [str(r.header.get("kid")) for blob in keywrap.decode_blobs("jwe", annotations[JWE_KEYS])
            for r in jwe.parse(blob).recipients]


def test_a_recipient_given_twice_is_wrapped_for_once(encoder: Encoder, tmp_path: Path) -> None:
    simple_image(tmp_path / "src", random_layers(1))
    jwk_copy = tmp_path / "same-key.jwk.json"
    jwk_copy.write_bytes((KEYS / "rsa2048.pub.jwk.json").read_bytes())
    result = ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'rsa2048.pub.pem'}",
                        "--recipient", f"jwe:{jwk_copy}",
                        "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
                        f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'enc'}"))
    assert f"jwe:{jwk_copy} is the same recipient as jwe:{KEYS / 'rsa2048.pub.pem'}" in (
        result.stderr)
    (layer,) = Reader(tmp_path / "enc").manifest()["layers"]
    rsa_kid = jwk.JWK.from_pem((KEYS / "rsa2048.pub.pem").read_bytes()).thumbprint()
    ec_kid = jwk.JWK.from_pem((KEYS / "ec256.pub.pem").read_bytes()).thumbprint()
    assert jwe_kids(layer) == [rsa_kid, ec_kid]


def test_adding_a_jwe_recipient_the_layer_has_adds_nothing(
    encoder: Encoder, tmp_path: Path
) -> None:
    simple_image(tmp_path / "src", random_layers(2))
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'rsa2048.pub.pem'}",
               f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'one'}"))
    # every layer already has it: the image is written as it is (a script may run twice),
    # each layer says so, and no --key is needed
    again = ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'rsa2048.pub.pem'}",
                       f"oci:{tmp_path / 'one'}", f"oci:{tmp_path / 'same'}"))
    assert again.stdout.count(f"already encrypted for jwe:{KEYS / 'rsa2048.pub.pem'} (as its "
                              "JWE's kids claim; give --key to check them); unchanged") == 2
    checked = ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'rsa2048.pub.pem'}", "--key",
                         KEYS / "rsa2048-pkcs8.pem", f"oci:{tmp_path / 'one'}",
                         f"oci:{tmp_path / 'checked'}"))
    assert checked.stdout.count(f"already encrypted for jwe:{KEYS / 'rsa2048.pub.pem'}; "
                                "unchanged") == 2
    assert Reader(tmp_path / "same").index["manifests"][0]["digest"] == (
        Reader(tmp_path / "one").index["manifests"][0]["digest"])
    Reader(tmp_path / "same").check_complete()
    # one old and one new recipient: only the new one is added
    result = ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'rsa2048.pub.pem'}",
                        "--recipient", f"jwe:{KEYS / 'ec384.pub.pem'}",
                        "--key", KEYS / "rsa2048-pkcs8.pem",
                        f"oci:{tmp_path / 'one'}", f"oci:{tmp_path / 'two'}"))
    assert f"added jwe:{KEYS / 'ec384.pub.pem'} (same ciphertext); already a recipient: " \
        f"jwe:{KEYS / 'rsa2048.pub.pem'}" in result.stdout
    rsa_kid = jwk.JWK.from_pem((KEYS / "rsa2048.pub.pem").read_bytes()).thumbprint()
    ec_kid = jwk.JWK.from_pem((KEYS / "ec384.pub.pem").read_bytes()).thumbprint()
    for layer in Reader(tmp_path / "two").manifest()["layers"]:
        assert jwe_kids(layer) == [rsa_kid, ec_kid]


def test_adding_a_pkcs7_recipient_the_layer_has_adds_nothing(
    encoder: Encoder, tmp_path: Path
) -> None:
    simple_image(tmp_path / "src", random_layers(1))
    ok(encoder("encrypt", "--recipient", f"pkcs7:{PKCS7 / 'alice-cert.pem'}",
               f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'one'}"))
    again = ok(encoder("encrypt", "--recipient", f"pkcs7:{PKCS7 / 'alice-cert.pem'}",
                       f"oci:{tmp_path / 'one'}", f"oci:{tmp_path / 'same'}"))
    assert "already encrypted for pkcs7:" in again.stdout
    (same,) = Reader(tmp_path / "same").manifest()["layers"]
    assert same == Reader(tmp_path / "one").manifest()["layers"][0]
    result = ok(encoder("encrypt", "--recipient", f"pkcs7:{PKCS7 / 'bob-cert.pem'}",
                        "--key", PKCS7 / "alice-key.pem", "--key", PKCS7 / "alice-cert.pem",
                        f"oci:{tmp_path / 'one'}", f"oci:{tmp_path / 'two'}"))
    assert f"added pkcs7:{PKCS7 / 'bob-cert.pem'}" in result.stdout
    (layer,) = Reader(tmp_path / "two").manifest()["layers"]
    assert layer["annotations"][PKCS7_KEYS].count(",") == 1, "one blob more, for bob only"


def test_layerinfo_names_jwe_recipients_by_public_key(encoder: Encoder, tmp_path: Path) -> None:
    simple_image(tmp_path / "src", random_layers(1))
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'rsa2048.pub.pem'}",
               "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
               f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'enc'}"))
    result = ok(encoder("layerinfo", "--json", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
                        f"oci:{tmp_path / 'enc'}"))
    (layer,) = json.loads(result.stdout)["manifests"][0]["layers"]
    assert [r.get("key") for r in layer["recipients"]] == [None, str(KEYS / "ec256.pub.pem")]
    assert "openedBy" not in layer, "a public key opens nothing"
    refused(encoder("layerinfo", "--recipient", f"pkcs7:{PKCS7 / 'alice-cert.pem'}",
                    f"oci:{tmp_path / 'enc'}"), "takes jwe: keys")
    refused(encoder("layerinfo", "--key", KEYS / "ec256.pub.pem", f"oci:{tmp_path / 'enc'}"),
            "public key, not a private key", "layerinfo --recipient jwe:FILE")


def test_replacing_an_image_under_its_ref_says_so(encoder: Encoder, tmp_path: Path) -> None:
    simple_image(tmp_path / "src", random_layers(1))
    first = ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'rsa2048.pub.pem'}",
                       f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'enc'}:app"))
    assert "replaces" not in first.stdout
    old = Reader(tmp_path / "enc").index["manifests"][0]["digest"]
    second = ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
                        f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'enc'}:app"))
    assert f"it replaces the image app was ({old})" in second.stdout
    (entry,) = Reader(tmp_path / "enc").index["manifests"]
    assert entry["digest"] != old


def _rewrite_kids(layout: Path, change: dict[int, str]) -> None:
    """Set the kid of JWE recipient i to change[i] in every layer (see _rewrite_jwe)."""

    def relabel(body: dict[str, Any]) -> None:
        for position, kid in change.items():
            body["recipients"][position]["header"]["kid"] = kid

    _rewrite_jwe(layout, relabel)


def test_an_altered_kid_does_not_stop_a_recipient_being_added(
    encoder: Encoder, tmp_path: Path
) -> None:
    """Kids sit in unprotected headers. Someone who relabels a recipient with Bob's kid must
    not make 'add Bob' a no-op, nor make layerinfo --key vouch for Bob."""
    simple_image(tmp_path / "src", random_layers(1))
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
               "--recipient", f"jwe:{KEYS / 'ec384.pub.pem'}",
               f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'enc'}"))
    bob = jwk.JWK.from_pem((KEYS / "rsa2048.pub.pem").read_bytes()).thumbprint()
    _rewrite_kids(tmp_path / "enc", {1: bob})
    # with a key that opens the layer, the claim is checked and Bob is really added
    added = ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'rsa2048.pub.pem'}",
                       "--key", KEYS / "ec256-sec1.pem", f"oci:{tmp_path / 'enc'}",
                       f"oci:{tmp_path / 'bob'}"))
    assert f"added jwe:{KEYS / 'rsa2048.pub.pem'}" in added.stdout
    ok(encoder("decrypt", "--key", KEYS / "rsa2048-pkcs8.pem", f"oci:{tmp_path / 'bob'}",
               f"oci:{tmp_path / 'plain'}"))
    info = json.loads(ok(encoder("layerinfo", "--json", "--key", KEYS / "ec256-sec1.pem",
                                 "--recipient", f"jwe:{KEYS / 'rsa2048.pub.pem'}",
                                 f"oci:{tmp_path / 'enc'}")).stdout)
    (layer,) = info["manifests"][0]["layers"]
    by_kid = {r["kid"]: r for r in layer["recipients"]}
    assert by_kid[bob]["kidVerified"] is False and "key" not in by_kid[bob]
    ec256 = jwk.JWK.from_pem((KEYS / "ec256.pub.pem").read_bytes()).thumbprint()
    assert by_kid[ec256]["kidVerified"] is False, "one altered kid taints its whole JWE"
    after = json.loads(ok(encoder("layerinfo", "--json", "--key", KEYS / "rsa2048-pkcs8.pem",
                                  f"oci:{tmp_path / 'bob'}")).stdout)
    entries = after["manifests"][0]["layers"][0]["recipients"]
    assert [r["kidVerified"] for r in entries if r.get("kid") == bob] == [False, True]
    text = ok(encoder("layerinfo", "--key", KEYS / "rsa2048-pkcs8.pem",
                      f"oci:{tmp_path / 'bob'}")).stdout
    assert text.count("kid altered: it fails its check") == 2, text
    unchecked = ok(encoder("layerinfo", f"oci:{tmp_path / 'bob'}")).stdout
    assert "(unchecked)" in unchecked and "kid altered" not in unchecked


def _rewrite_jwe(layout: Path, change: Any) -> None:
    """Apply change(body) to the (general JSON) JWE of every layer and re-digest, as someone
    who can edit manifests but holds no key can."""
    import base64
    import hashlib

    index = json.loads((layout / "index.json").read_text())
    entry = index["manifests"][0]
    manifest = json.loads((layout / "blobs" / "sha256" / entry["digest"].split(":")[1])
                          .read_text())
    for layer in manifest["layers"]:
        value = layer["annotations"][JWE_KEYS]
        body = json.loads(base64.b64decode(value.split(",")[0]))
        extra = change(body)
        blobs = [base64.b64encode(json.dumps(body).encode()).decode()]
        if extra is not None:
            blobs.append(base64.b64encode(json.dumps(extra).encode()).decode())
        layer["annotations"][JWE_KEYS] = ",".join(blobs)
    data = json.dumps(manifest).encode()
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    entry.update(digest=f"sha256:{digest}", size=len(data))
    (layout / "index.json").write_text(json.dumps(index))


def test_a_spoiled_wrapped_key_fails_the_recipients_check(encoder: Encoder, tmp_path: Path) -> None:
    """The HMAC binds each recipient's wrapped key too: junk in Bob's entry (his kid left
    alone) must not let 'add Bob' pass as done."""
    import base64
    import os

    simple_image(tmp_path / "src", random_layers(1))
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
               "--recipient", f"jwe:{KEYS / 'rsa2048.pub.pem'}",
               f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'enc'}"))

    def spoil(body: dict[str, Any]) -> None:
        body["recipients"][1]["encrypted_key"] = base64.urlsafe_b64encode(
            os.urandom(256)).rstrip(b"=").decode()

    _rewrite_jwe(tmp_path / "enc", spoil)
    added = ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'rsa2048.pub.pem'}", "--key",
                       KEYS / "ec256-sec1.pem", f"oci:{tmp_path / 'enc'}",
                       f"oci:{tmp_path / 'fixed'}"))
    assert f"added jwe:{KEYS / 'rsa2048.pub.pem'}" in added.stdout
    ok(encoder("decrypt", "--key", KEYS / "rsa2048-pkcs8.pem", f"oci:{tmp_path / 'fixed'}",
               f"oci:{tmp_path / 'plain'}"))


def test_a_non_ascii_recipients_mac_is_a_failed_check_not_a_crash(
    encoder: Encoder, tmp_path: Path
) -> None:
    simple_image(tmp_path / "src", random_layers(1))
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
               "--recipient", f"jwe:{KEYS / 'ec384.pub.pem'}",
               f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'enc'}"))

    def append_one(body: dict[str, Any]) -> dict[str, Any]:
        import base64

        forged = json.loads(json.dumps(body))
        protected = json.loads(base64.urlsafe_b64decode(forged["protected"] + "=="))
        protected["urn:pyimgcrypt:kids-hmac"] = "\ud800"
        forged["protected"] = base64.urlsafe_b64encode(
            json.dumps(protected).encode()).rstrip(b"=").decode()
        return forged

    _rewrite_jwe(tmp_path / "enc", append_one)
    info = json.loads(ok(encoder("layerinfo", "--json", "--key", KEYS / "ec256-sec1.pem",
                                 f"oci:{tmp_path / 'enc'}")).stdout)
    checks = [r["kidVerified"] for r in info["manifests"][0]["layers"][0]["recipients"]]
    assert checks == [True, True, False, False]
