#!/usr/bin/env bash
# Regenerates the committed test assets: keys in every encoding (openssl, jwcrypto) and
# layers encrypted by skopeo. Run from anywhere: bash tests/assets/generate.sh
# Needs openssl, skopeo, umoci, busybox-static and the project venv (for jwcrypto).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-$here/../../.venv/bin/python}
keys=$here/keys; skopeo_dir=$here/skopeo
rm -rf "$keys" "$skopeo_dir"; mkdir -p "$keys" "$skopeo_dir"
cd "$keys"
q() { "$@" 2>/dev/null; }

# RSA 2048 in each encoding
q openssl genrsa -traditional -out rsa2048-pkcs1.pem 2048
q openssl pkcs8 -topk8 -nocrypt -in rsa2048-pkcs1.pem -out rsa2048-pkcs8.pem
q openssl rsa -in rsa2048-pkcs1.pem -outform DER -traditional -out rsa2048-pkcs1.der
q openssl pkcs8 -topk8 -nocrypt -in rsa2048-pkcs1.pem -outform DER -out rsa2048-pkcs8.der
q openssl rsa -in rsa2048-pkcs1.pem -pubout -out rsa2048.pub.pem
q openssl pkey -pubin -in rsa2048.pub.pem -outform DER -out rsa2048.pub.der  # SubjectPublicKeyInfo
q openssl pkcs8 -topk8 -v2 aes-256-cbc -passout pass:s3cret -in rsa2048-pkcs1.pem -out rsa2048-pkcs8-encrypted.pem
q openssl rsa -in rsa2048-pkcs1.pem -aes256 -traditional -passout pass:s3cret -out rsa2048-legacy-encrypted.pem
# Keys whose password-based encryption is too costly for the decoder to try (it skips them)
q openssl pkcs8 -topk8 -v2 aes-256-cbc -iter 3000000 -passout pass:s3cret -in rsa2048-pkcs1.pem -out rsa2048-pkcs8-costly-pbkdf2.pem
q openssl req -new -x509 -key rsa2048-pkcs1.pem -subj /CN=pyimgcrypt-test -days 36500 -out rsa2048.cert.pem
# RSA 4096
q openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:4096 -out rsa4096-pkcs8.pem
q openssl pkey -in rsa4096-pkcs8.pem -pubout -out rsa4096.pub.pem
# A second RSA key that is nobody's recipient
q openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out other-rsa2048.pem
# EC: SEC1 PEM as `openssl ecparam -genkey` writes it (EC PARAMETERS block first), PKCS#8, DER
for c in 256:prime256v1 384:secp384r1 521:secp521r1; do
  bits=${c%%:*}; name=${c#*:}
  q openssl ecparam -name "$name" -genkey -out "ec$bits-sec1.pem"
  q openssl pkcs8 -topk8 -nocrypt -in "ec$bits-sec1.pem" -out "ec$bits-pkcs8.pem"
  q openssl ec -in "ec$bits-sec1.pem" -outform DER -out "ec$bits-sec1.der"
  q openssl ec -in "ec$bits-sec1.pem" -pubout -out "ec$bits.pub.pem"
done
q openssl pkey -pubin -in ec256.pub.pem -outform DER -out ec256.pub.der
q openssl pkcs8 -topk8 -scrypt -scrypt_N 16384 -scrypt_r 8 -scrypt_p 64 -passout pass:s3cret -in ec256-sec1.pem -out ec256-pkcs8-costly-scrypt.pem
q openssl genpkey -algorithm ED25519 -out ed25519.pem
# JWKs made from the PEM keys
"$py" - <<'PY'
from jwcrypto import jwk
for name in ("rsa2048-pkcs1", "ec256-sec1"):
    key = jwk.JWK.from_pem(open(f"{name}.pem", "rb").read())
    open(f"{name.split('-')[0]}.jwk.json", "w").write(key.export_private())
    open(f"{name.split('-')[0]}.pub.jwk.json", "w").write(key.export_public())
PY

# Layers encrypted by skopeo
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
cd "$work"
echo '{"default":[{"type":"insecureAcceptAnything"}]}' > policy.json
umoci init --layout img >/dev/null
umoci new --image img:v1 >/dev/null
umoci unpack --rootless --image img:v1 bundle >/dev/null 2>&1
head -c 30000 /dev/urandom > bundle/rootfs/payload.bin
echo "pyimgcrypt fixture" > bundle/rootfs/hello.txt
umoci repack --image img:v1 bundle >/dev/null
sk() { skopeo --policy policy.json copy -q "$@"; }
sk --encryption-key "jwe:$keys/rsa2048.pub.pem" oci:img:v1 oci:out:rsa2048
sk --encryption-key "jwe:$keys/rsa4096.pub.pem" oci:img:v1 oci:out:rsa4096
sk --encryption-key "jwe:$keys/ec256.pub.pem" oci:img:v1 oci:out:ec256
sk --encryption-key "jwe:$keys/ec384.pub.pem" oci:img:v1 oci:out:ec384
sk --encryption-key "jwe:$keys/ec521.pub.pem" oci:img:v1 oci:out:ec521
sk --encryption-key "jwe:$keys/rsa2048.pub.pem" --encryption-key "jwe:$keys/ec384.pub.pem" oci:img:v1 oci:out:two-recipients
sk --dest-compress-format zstd --dest-compress oci:img:v1 oci:plain:zstd
sk --encryption-key "jwe:$keys/ec256.pub.pem" oci:plain:zstd oci:out:zstd
# skopeo recompresses while encrypting here and records the SOURCE blob's digest:
sk --dest-compress-format zstd --dest-compress --encryption-key "jwe:$keys/ec256.pub.pem" oci:img:v1 oci:out:zstd-recompressed
"$py" - img raw <<'PY'
import gzip, hashlib, json, os, sys
src, dst = sys.argv[1:3]
os.makedirs(f"{dst}/blobs/sha256")
def blob(layout, digest): return open(f"{layout}/blobs/sha256/{digest[7:]}", "rb").read()
def put(data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    open(f"{dst}/blobs/sha256/{digest[7:]}", "wb").write(data)
    return digest
index = json.load(open(f"{src}/index.json"))
manifest = json.loads(blob(src, index["manifests"][0]["digest"]))
put(blob(src, manifest["config"]["digest"]))
tar = gzip.decompress(blob(src, manifest["layers"][0]["digest"]))
manifest["layers"] = [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": put(tar), "size": len(tar)}]
body = json.dumps(manifest).encode()
entry = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(body), "size": len(body),
         "annotations": {"org.opencontainers.image.ref.name": "v1"}}
json.dump({"schemaVersion": 2, "manifests": [entry]}, open(f"{dst}/index.json", "w"))
open(f"{dst}/oci-layout", "w").write('{"imageLayoutVersion":"1.0.0"}')
PY
# an uncompressed source layer: skopeo gzips it while encrypting and records the tar's digest
sk --encryption-key "jwe:$keys/ec256.pub.pem" oci:raw:v1 oci:out:tar-recompressed
"$py" - "$work" "$skopeo_dir" <<'PY'
import json, shutil, sys
work, out = sys.argv[1:3]
def manifest(layout, ref):
    index = json.load(open(f"{work}/{layout}/index.json"))
    [entry] = [m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == ref]
    return json.load(open(f"{work}/{layout}/blobs/sha256/{entry['digest'][7:]}"))
plain_gzip = manifest("img", "v1")["layers"][0]["digest"]
plain_zstd = manifest("plain", "zstd")["layers"][0]["digest"]
plain_tar = manifest("raw", "v1")["layers"][0]["digest"]
plaintext = {"zstd": plain_zstd, "zstd-recompressed": plain_zstd, "tar-recompressed": None}
for ref in ("rsa2048", "rsa4096", "ec256", "ec384", "ec521", "two-recipients", "zstd",
            "zstd-recompressed", "tar-recompressed"):
    [layer] = manifest("out", ref)["layers"]
    shutil.copy(f"{work}/out/blobs/sha256/{layer['digest'][7:]}", f"{out}/{ref}.blob")
    layer["x-plaintext-digest"] = plaintext.get(ref, plain_gzip)
    if ref == "tar-recompressed":
        layer["x-uncompressed-digest"] = plain_tar
    json.dump(layer, open(f"{out}/{ref}.json", "w"), indent=1, sort_keys=True)
PY
echo "assets regenerated in $here"
