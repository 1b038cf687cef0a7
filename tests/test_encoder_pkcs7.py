"""ctd-encoder with pkcs7 recipients: these need decoder.keywrap.pkcs7 (wrap, unwrap, describe);
skopeo and Go ocicrypt check the same layers in integration/test_encoder.py."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from decoder import keywrap
from decoder.keys import load_keyring
from decoder.keywrap import pkcs7
from tests.layouts import Reader, digest, random_layers, simple_image
from tests.support import KEYS
from tests.test_encoder import Encoder, decrypt_with_decoder, encoder, ok, refused

__all__ = ["encoder"]  # the fixture, imported for these tests

PKCS7_KEYS = "org.opencontainers.image.enc.keys.pkcs7"
JWE_KEYS = "org.opencontainers.image.enc.keys.jwe"
CERT = KEYS / "rsa2048.cert.pem"


def test_pkcs7_recipient_round_trips(encoder: Encoder, tmp_path: Path) -> None:
    layers = random_layers(1, 100_000)
    simple_image(tmp_path / "src", layers)
    ok(encoder("encrypt", "--recipient", f"pkcs7:{CERT}", f"oci:{tmp_path / 'src'}",
               f"oci:{tmp_path / 'enc'}"))
    out = Reader(tmp_path / "enc")
    (layer,) = out.manifest()["layers"]
    assert set(layer["annotations"]) == {PKCS7_KEYS, "org.opencontainers.image.enc.pubopts"}
    blob = base64.b64decode(layer["annotations"][PKCS7_KEYS])
    assert blob[0] == 0x30, "DER ContentInfo"
    ring = load_keyring([], {"privkeys": [(KEYS / "rsa2048-pkcs8.pem").read_bytes()],
                             "x509s": [CERT.read_bytes()]})
    opened = keywrap.unwrap_private_options(layer["annotations"], ring, "layer")
    assert json.loads(opened)["digest"] == digest(layers[0].data)
    notes: list[str] = []
    assert pkcs7.unwrap([blob], ring, notes) == opened
    # the decoder: key and certificate in one PEM file, as a node's key directory holds them
    both = tmp_path / "key-and-cert.pem"
    both.write_bytes((KEYS / "rsa2048-pkcs8.pem").read_bytes() + CERT.read_bytes())
    ciphertext = out.blob(layer["digest"])
    ok(encoder("decrypt", "--key", both, f"oci:{tmp_path / 'enc'}", f"oci:{tmp_path / 'dec'}"))
    assert Reader(tmp_path / "dec").manifest()["layers"] == [layers[0].descriptor()]
    assert ciphertext != layers[0].data


def test_pkcs7_and_jwe_recipients_together(encoder: Encoder, tmp_path: Path) -> None:
    layers = random_layers(1)
    simple_image(tmp_path / "src", layers)
    ok(encoder("encrypt", "--recipient", f"pkcs7:{CERT}",
               "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
               f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'enc'}"))
    out = Reader(tmp_path / "enc")
    (layer,) = out.manifest()["layers"]
    assert {PKCS7_KEYS, JWE_KEYS} <= set(layer["annotations"])
    ciphertext = out.blob(layer["digest"])
    assert decrypt_with_decoder(layer, ciphertext, "ec256-sec1.pem") == layers[0].data
    info = ok(encoder("layerinfo", "--key", KEYS / "rsa2048-pkcs8.pem", "--key", CERT,
                      f"oci:{tmp_path / 'enc'}")).stdout
    assert "pkcs7: " in info
    assert "pyimgcrypt-test" in info, "the certificate's subject names the recipient"
    assert f"opened by: {KEYS / 'rsa2048-pkcs8.pem'}" in info


def test_adding_a_pkcs7_recipient_to_a_jwe_layer(encoder: Encoder, tmp_path: Path) -> None:
    layers = random_layers(1)
    simple_image(tmp_path / "src", layers)
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec384.pub.pem'}",
               f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'one'}"))
    ok(encoder("encrypt", "--recipient", f"pkcs7:{CERT}", "--key", KEYS / "ec384-sec1.pem",
               f"oci:{tmp_path / 'one'}", f"oci:{tmp_path / 'two'}"))
    first = Reader(tmp_path / "one").manifest()["layers"][0]
    second = Reader(tmp_path / "two").manifest()["layers"][0]
    assert second["digest"] == first["digest"]
    refused(encoder("decrypt", "--key", KEYS / "rsa2048-pkcs8.pem", f"oci:{tmp_path / 'two'}",
                    f"oci:{tmp_path / 'no-cert'}"), "no key opens layer")
    ok(encoder("decrypt", "--key", KEYS / "rsa2048-pkcs8.pem", "--key", CERT,
               f"oci:{tmp_path / 'two'}", f"oci:{tmp_path / 'dec'}"))
    assert Reader(tmp_path / "dec").manifest()["layers"] == [layers[0].descriptor()]
