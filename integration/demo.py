"""`make demo`: pyimgcrypt's main job done for real on this machine, narrated step by step.

Owns the story, not the machinery (that is integration/harness.py, shared with the tests):
make a key pair, build a small busybox image, encrypt it with ctd-encoder (and show with
`ctd-encoder layerinfo` who it is encrypted for), push it with skopeo to a registry on
127.0.0.1, start containerd with our ctd-decoder as its stream processor, pull the image
through CRI the way the kubelet does, run a container from it, and show that a node without
the key refuses the image with a clear message. Everything runs in one temporary directory
and is stopped and removed at the end (unless --keep). Needs root and `make deps`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness

GREETING = "Hello from inside an encrypted image!\n"


class Narrator:
    """Numbered steps and indented details on stdout, flushed as they happen."""

    def __init__(self, total: int):
        self.total = total
        self.number = 0

    def step(self, text: str) -> None:
        self.number += 1
        print(f"\n[{self.number}/{self.total}] {text}", flush=True)

    def detail(self, text: str) -> None:
        print(textwrap.indent(text.rstrip("\n"), "      "), flush=True)


def stream_processor_section(config: str) -> str:
    """The [stream_processors...] tables of a containerd config (the harness writes them last)."""
    start = config.index("\n[stream_processors")
    return config[start:].strip()


def demo(decoder: Path, keep: bool) -> None:
    say = Narrator(total=10)
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(harness.work_dir("pyimgcrypt-demo-", keep=keep))
        if keep:
            print(f"(work directory, kept afterwards: {work})")

        say.step("Make a key pair for the node (RSA 2048, with openssl).")
        key = harness.make_key(work / "keys", "rsa", "pkcs8-pem")
        kind = harness.describe_key_file(key.key_bytes)
        say.detail(f"public key, used to encrypt:    {key.public_pem}\n"
                   f"private key, given to the node:  {key.key_file} ({kind}, PKCS#8)")

        say.step("Build a small image with umoci: busybox plus a file to print.")
        image = harness.build_image(work / "image", "demo", [{"/hello.txt": GREETING}])
        say.detail(f"OCI layout {image.source}\n"
                   f"one layer, {image.layer_media_types[0]}\n"
                   f"/hello.txt says: {GREETING.strip()}")

        say.step("Start a registry (Debian's docker-registry) on 127.0.0.1 only.")
        registry = stack.enter_context(harness.Registry(work / "registry"))
        say.detail(f"listening on http://{registry.host}")

        say.step("Encrypt the image for the public key with ctd-encoder, and ask who can open it.")
        encrypted = f"oci:{work / 'encrypted.oci'}:{image.tag}"
        private_key = work / "keys" / key.key_file
        private_key.write_bytes(key.key_bytes)
        private_key.chmod(0o600)
        result = harness.encoder("encrypt", "--recipient", f"jwe:{key.public_pem}",
                                 image.source, encrypted)
        say.detail(f"$ ctd-encoder encrypt --recipient jwe:{key.public_pem.name} "
                   f"{image.source} {encrypted}\n{result.stdout}")
        info = harness.encoder("layerinfo", "--key", private_key, encrypted).stdout
        say.detail(f"$ ctd-encoder layerinfo --key {private_key.name} {encrypted}\n"
                   "(the recipient's kid is its public key's RFC 7638 thumbprint; --key names\n"
                   f"the key file it belongs to and checks that it opens the layer)\n{info}")

        say.step("Push the encrypted image to the registry (skopeo copies its blobs as they are).")
        pushed = harness.push_layout(encrypted, registry, "demo/hello", image, work)
        layer = pushed.layers[0]
        _status, blob = registry.get(f"/v2/demo/hello/blobs/{layer['digest']}")
        looks = "a gzip stream" if blob[:2] == b"\x1f\x8b" else "not gzip: it is ciphertext"
        wrapped = sorted(a for a in layer["annotations"] if a.startswith("org.opencontainers"))
        say.detail(f"pushed {pushed.ref}\n"
                   f"the registry's layer: {layer['mediaType']}, {layer['size']} bytes\n"
                   f"its first bytes are {blob[:4].hex(' ')} ({looks})\n"
                   f"annotations: {', '.join(wrapped)}")

        say.step("Start containerd with the CRI plugin, decrypting through our ctd-decoder.")
        node = stack.enter_context(harness.Node(work / "node", decoder, registry.host,
                                                name="node"))
        harness.write_key_files(node.keys_dir, key.files)
        say.detail(f"decoder:      {decoder} ({harness.check_decoder(decoder)})\n"
                   f"config:       {node.config_path}\n"
                   f"socket:       {node.socket}\n"
                   f"node keys:    {node.keys_dir}/{key.key_file}\n"
                   "stream processors in the config, from config/containerd-1.x.toml with\n"
                   "this node's decoder and key directory (zstd layers go to the tar.gzip id;\n"
                   "tar.gzip and tar are the only ids containerd hands the decryption payload to;\n"
                   "keys-extra is a second, empty key directory and sysroot stands in for / in\n"
                   "this private node, both from the test harness):")
        say.detail(textwrap.indent(stream_processor_section(node.config_text()), "  "))

        say.step("Pull the image through CRI (runtime.v1.ImageService/PullImage), as the kubelet.")
        before = node.snapshots()
        image_id = node.pull(pushed.ref)
        unpacked = sorted(node.snapshots() - before)
        say.detail(f"CRI answered image_ref {image_id}\n"
                   f"containerd unpacked snapshot {', '.join(unpacked)}\n"
                   f"which is the layer's plaintext diffID {image.diff_ids[0]}: "
                   f"{unpacked == image.diff_ids}\n"
                   "(the layer in the registry is ciphertext, so the decoder ran to produce it)")

        say.step("Run a container from the encrypted image (ctr run ... cat /hello.txt).")
        output = node.run_container(pushed.ref, ["/bin/busybox", "cat", "/hello.txt"])
        say.detail(f"the container printed: {output.strip()}")
        if output != GREETING:
            raise harness.HarnessError(f"the container printed {output!r}, not {GREETING!r}")

        say.step("Start a second node that does not have the key, and pull the same image.")
        stranger = stack.enter_context(harness.Node(work / "node-without-key", decoder,
                                                    registry.host, name="node-without-key"))
        other = harness.make_key(work / "other-keys", "ec-p256", "pkcs8-pem")
        harness.write_key_files(stranger.keys_dir, other.files)
        say.detail(f"its key directory holds only an unrelated EC key: {stranger.keys_dir}")
        errors = harness.pull_expecting_refusal(stranger, pushed)
        for lost in errors[:-1]:
            say.detail("containerd reported only a diffID mismatch (it read the decoder's exit\n"
                       f"status too early), so pulling again: {lost}")
        say.detail("the pull failed, and containerd passed on the decoder's message:\n"
                   + textwrap.fill(harness.decoder_message(errors[-1]), 96,
                                   subsequent_indent="  ", break_on_hyphens=False,
                                   break_long_words=False))
        leftovers = set(pushed.chain_ids) & stranger.snapshots()
        say.detail(f"images on that node: {len(stranger.image_refs())}; "
                   f"snapshots of the image: {len(leftovers)}")
        if leftovers:
            raise harness.HarnessError("the node without the key unpacked the image anyway")

        say.step("Stop containerd (both nodes) and the registry, and remove the work directory.")
    print("      done: every process stopped, every mount undone.")
    print("\nDemo complete: the encrypted image ran on the node with the key and was refused,")
    print("with a clear message, on the node without it.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--decoder", type=Path, default=harness.pip_decoder(),
                        help="the ctd-decoder program to configure (default: this venv's)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (configs, logs) afterwards")
    args = parser.parse_args(argv)
    try:
        harness.require_tools()
        demo(args.decoder.resolve(), args.keep)
    except (harness.HarnessError, harness.PullFailed, AssertionError) as e:
        print(f"\ndemo failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
