#!/usr/bin/env bash
# Regenerates the PKCS7 test assets: two RSA keys with certificates (alice self-signed, bob
# issued by a throwaway CA with serial 0x1a2b) and layers encrypted by skopeo for them.
# Run from anywhere: bash tests/assets/pkcs7/generate.sh
# Needs openssl, skopeo, umoci and python3; the JWE half of the mixed layer uses
# tests/assets/keys/rsa2048.pub.pem (made by tests/assets/generate.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
keys=$here/../keys
find "$here" -mindepth 1 ! -name generate.sh -delete
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
q() { "$@" 2>/dev/null; }

cd "$here"
q openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out alice-key.pem
q openssl req -new -x509 -key alice-key.pem -subj /CN=pyimgcrypt-pkcs7-alice -days 36500 \
  -out alice-cert.pem
q openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:3072 -out "$work/ca-key.pem"
q openssl req -new -x509 -key "$work/ca-key.pem" -subj "/O=pyimgcrypt/CN=pyimgcrypt test CA" \
  -days 36500 -out "$work/ca-cert.pem"
q openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out bob-key.pem
q openssl req -new -key bob-key.pem -subj /CN=pyimgcrypt-pkcs7-bob -out "$work/bob.csr"
q openssl x509 -req -in "$work/bob.csr" -CA "$work/ca-cert.pem" -CAkey "$work/ca-key.pem" \
  -set_serial 0x1a2b -days 36500 -out bob-cert.pem

cd "$work"
echo '{"default":[{"type":"insecureAcceptAnything"}]}' > policy.json
umoci init --layout img >/dev/null
umoci new --image img:v1 >/dev/null
umoci unpack --rootless --image img:v1 bundle >/dev/null 2>&1
head -c 20000 /dev/urandom > bundle/rootfs/payload.bin
echo "pyimgcrypt pkcs7 fixture" > bundle/rootfs/hello.txt
umoci repack --image img:v1 bundle >/dev/null
sk() { skopeo --policy policy.json copy -q "$@"; }
sk --encryption-key "pkcs7:$here/alice-cert.pem" oci:img:v1 oci:out:alice
sk --encryption-key "pkcs7:$here/alice-cert.pem" --encryption-key "pkcs7:$here/bob-cert.pem" \
  oci:img:v1 oci:out:two-recipients
sk --encryption-key "jwe:$keys/rsa2048.pub.pem" --encryption-key "pkcs7:$here/bob-cert.pem" \
  oci:img:v1 oci:out:jwe-and-pkcs7
python3 - "$work" "$here" <<'PY'
import json, shutil, sys
work, out = sys.argv[1:3]
def manifest(layout, ref):
    index = json.load(open(f"{work}/{layout}/index.json"))
    [entry] = [m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == ref]
    return json.load(open(f"{work}/{layout}/blobs/sha256/{entry['digest'][7:]}"))
plain = manifest("img", "v1")["layers"][0]["digest"]
for ref in ("alice", "two-recipients", "jwe-and-pkcs7"):
    [layer] = manifest("out", ref)["layers"]
    shutil.copy(f"{work}/out/blobs/sha256/{layer['digest'][7:]}", f"{out}/{ref}.blob")
    layer["x-plaintext-digest"] = plain
    json.dump(layer, open(f"{out}/{ref}.json", "w"), indent=1, sort_keys=True)
PY
echo "pkcs7 assets regenerated in $here"
