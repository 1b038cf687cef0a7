"""The benchmarks: decoder throughput and peak RSS, small-layer start-up, encoder, CRI pull.

Each returns `Comparison`s (see `measure`); every measured run checks its result:
- a decoder run must exit 0 and write exactly the plaintext layer (compared byte for byte
  with the plain image's blob as it streams);
- an encoder run must exit 0 and write an image whose layers are encrypted and decrypt
  (with the reference decoder, outside the measurement) to the original layers, or, when
  decrypting, whose layers are the original ones byte for byte;
- a CRI pull must return the image's config digest and leave every layer's snapshot, and the
  image's marker file must read back from a mount of the unpacked image.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import harness
from decoder.spec import MEDIA_TYPE_ENV
from tests.support import payload_bytes

from bench import programs
from bench.data import (
    RANDOM_LAYER,
    TAG,
    BenchImage,
    Keys,
    blob_path,
    file_sha256,
    manifest_layers,
    size_label,
)
from bench.measure import (
    BenchError,
    Comparison,
    Sample,
    WrongOutput,
    alternate,
    expect_output,
    expect_same_output,
    expect_success,
    program_env,
    scratch_dir,
    spawn,
)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Rounds:
    warmup: int
    runs: int


# --- decoders ------------------------------------------------------------------------------


def decoder_run(decoder: Path, image: BenchImage, key: Keys) -> Callable[[], Sample]:
    """One run of a decoder on the image's random layer, as containerd starts it."""
    payload = image.payload()
    env = program_env({MEDIA_TYPE_ENV: str(image.descriptor["mediaType"])})
    argv: list[str | Path] = [decoder, "--decryption-keys-path", key.directory]

    def run() -> Sample:
        done = spawn(argv, stdin=image.ciphertext, payload=payload, env=env,
                     reference=image.plaintext)
        return expect_same_output(done, image.plaintext)

    return run


def decoders_comparison(
    name: str, image: BenchImage, key: Keys, decoders: Mapping[str, Path], rounds: Rounds,
    progress: Progress,
) -> Comparison:
    variants = {label: decoder_run(path, image, key) for label, path in decoders.items()}
    comparison = alternate(name, variants, warmup=rounds.warmup, runs=rounds.runs,
                           progress=progress)
    comparison.size = image.size
    return comparison


def python_floor(rounds: Rounds, progress: Progress) -> Comparison:
    """The interpreter alone (`python -c pass` of the venv): the floor under the pip start-up."""
    python = programs.VENV_BIN / "python"

    def run() -> Sample:
        return expect_success(spawn([python, "-c", "pass"], hash_stdout=False))

    return alternate("python -c pass", {"python -c pass": run}, warmup=rounds.warmup,
                     runs=rounds.runs, progress=progress)


@dataclass
class ImportProfile:
    """`python -X importtime` of the pip entry point decoding the small layer (medians, ms)."""

    runs: int
    total_ms: float = 0.0
    top_level: list[tuple[str, float]] = field(default_factory=list)  # cumulative
    by_package: list[tuple[str, float]] = field(default_factory=list)  # self times summed
    error: str | None = None


def import_profile(image: BenchImage, key: Keys, runs: int) -> ImportProfile:
    """Median self+children import time of each top-level import, and of all imports."""
    argv: list[str | Path] = [programs.VENV_BIN / "python", "-X", "importtime",
                              programs.PIP_DECODER, "--decryption-keys-path", key.directory]
    env = program_env({MEDIA_TYPE_ENV: str(image.descriptor["mediaType"])})
    totals: list[float] = []
    per_module: dict[str, list[float]] = {}
    per_package: dict[str, list[float]] = {}
    profile = ImportProfile(runs)
    try:
        for _ in range(runs):
            done = spawn(argv, stdin=image.ciphertext, payload=image.payload(), env=env)
            expect_output(done, image.plaintext_digest, image.plaintext_size)
            total, top, packages = parse_importtime(done.stderr)
            totals.append(total)
            for module, cumulative in top.items():
                per_module.setdefault(module, []).append(cumulative)
            for package, own in packages.items():
                per_package.setdefault(package, []).append(own)
    except (WrongOutput, BenchError) as e:
        profile.error = str(e)
        return profile
    profile.total_ms = statistics.median(totals) / 1000
    ranked = sorted(((m, statistics.median(v) / 1000) for m, v in per_module.items()),
                    key=lambda item: -item[1])
    profile.top_level = ranked
    profile.by_package = sorted(
        ((p, statistics.median(v) / 1000) for p, v in per_package.items()), key=lambda i: -i[1]
    )
    return profile


def parse_importtime(stderr: str) -> tuple[float, dict[str, float], dict[str, float]]:
    """(sum of self times, {top-level import: cumulative}, {root package: sum of self times}),
    all in microseconds."""
    rows: list[tuple[int, str, int, int]] = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        parts = line[len("import time:"):].split("|")
        if len(parts) != 3:
            continue
        name_field = parts[2].rstrip()
        depth = len(name_field) - len(name_field.lstrip())
        rows.append((depth, name_field.strip(), int(parts[0]), int(parts[1])))
    if not rows:
        return 0.0, {}, {}
    top_depth = min(depth for depth, *_ in rows)
    total = float(sum(own for _, _, own, _ in rows))
    top: dict[str, float] = {}
    packages: dict[str, float] = {}
    for depth, name, own, cumulative in rows:
        if depth == top_depth:
            top[name] = top.get(name, 0.0) + cumulative
        root = name.split(".")[0]
        packages[root] = packages.get(root, 0.0) + own
    return total, top, packages


# --- encoder -------------------------------------------------------------------------------


@contextlib.contextmanager
def output_dirs(prefix: str) -> Iterator[Callable[[], Path]]:
    """Fresh output directories on tmpfs (no disk write-back in the measurements), all removed
    at the end; each new one removes the one before."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=scratch_dir()))
    current: list[Path] = []

    def fresh() -> Path:
        for old in current:
            shutil.rmtree(old, ignore_errors=True)
        current.clear()
        path = base / uuid.uuid4().hex[:8]
        current.append(path)
        return path

    try:
        yield fresh
    finally:
        shutil.rmtree(base, ignore_errors=True)


def check_encrypted_image(layout: Path, image: BenchImage, refdec: Path, key: Keys) -> None:
    """Every layer encrypted; the random layer decrypts (reference decoder) to the original."""
    layers = manifest_layers(layout)
    if len(layers) != len(image.plain_layers):
        raise WrongOutput(f"{layout}: {len(layers)} layers, expected {len(image.plain_layers)}")
    for layer in layers:
        if not str(layer.get("mediaType", "")).endswith("+encrypted"):
            raise WrongOutput(f"{layout}: layer {layer['digest']} is not encrypted")
    descriptor = layers[RANDOM_LAYER]
    done = spawn([refdec, "--decryption-keys-path", key.directory],
                 stdin=blob_path(layout, descriptor["digest"]), payload=payload_bytes(descriptor),
                 env=program_env({MEDIA_TYPE_ENV: str(descriptor["mediaType"])}))
    try:
        expect_output(done, image.plaintext_digest, image.plaintext_size)
    except WrongOutput as e:
        raise WrongOutput(f"the encrypted layer does not decrypt to the original: {e}") from e


def check_decrypted_image(layout: Path, image: BenchImage) -> None:
    """The layers are the original plain layers, byte for byte."""
    layers = manifest_layers(layout)
    wanted = [(d["mediaType"], d["digest"], d["size"]) for d in image.plain_layers]
    got = [(d["mediaType"], d["digest"], d["size"]) for d in layers]
    if got != wanted:
        raise WrongOutput(f"{layout}: layers {got}, expected {wanted}")
    descriptor = layers[RANDOM_LAYER]
    if file_sha256(blob_path(layout, descriptor["digest"])) != descriptor["digest"]:
        raise WrongOutput(f"{layout}: the random layer's blob does not match its digest")


def encoder_comparisons(
    image: BenchImage, key: Keys, refdec: Path, rounds: Rounds, progress: Progress,
) -> list[Comparison]:
    """ctd-encoder against skopeo copy: encrypting the plain image, decrypting the encrypted."""
    policy = harness.policy_file(image.directory)
    source = f"oci:{image.plain}:{TAG}"
    encrypted = f"oci:{image.encrypted}:{TAG}"
    results = []
    with output_dirs("pyimgcrypt-bench-enc-") as fresh:

        def command(argv: list[str | Path], check: Callable[[Path], None],
                    out: Path) -> Sample:
            log = out.with_suffix(".stdout")
            out.parent.mkdir(parents=True, exist_ok=True)
            done = spawn(argv, stdout=log, env=program_env(), timeout=900)
            sample = expect_success(done)
            check(out)
            return sample

        def encrypt_ours() -> Sample:
            out = fresh() / "out.oci"
            return command([programs.ENCODER, "encrypt", "--recipient", f"jwe:{key.public}",
                            source, f"oci:{out}:{TAG}"],
                           lambda p: check_encrypted_image(p, image, refdec, key), out)

        def encrypt_skopeo() -> Sample:
            out = fresh() / "out.oci"
            return command(["/usr/bin/skopeo", "copy", "--quiet", "--policy", policy,
                            "--encryption-key", f"jwe:{key.public}", source, f"oci:{out}:{TAG}"],
                           lambda p: check_encrypted_image(p, image, refdec, key), out)

        def decrypt_ours() -> Sample:
            out = fresh() / "out.oci"
            return command([programs.ENCODER, "decrypt", "--key", key.private, encrypted,
                            f"oci:{out}:{TAG}"], lambda p: check_decrypted_image(p, image), out)

        def decrypt_skopeo() -> Sample:
            out = fresh() / "out.oci"
            return command(["/usr/bin/skopeo", "copy", "--quiet", "--policy", policy,
                            "--decryption-key", key.private, encrypted, f"oci:{out}:{TAG}"],
                           lambda p: check_decrypted_image(p, image), out)

        for name, ours, theirs in (("encoder encrypt", encrypt_ours, encrypt_skopeo),
                                   ("encoder decrypt", decrypt_ours, decrypt_skopeo)):
            comparison = alternate(name, {"ctd-encoder": ours, "skopeo": theirs},
                                   warmup=rounds.warmup, runs=rounds.runs, progress=progress)
            comparison.note = f"a {size_label(image.requested)} random layer and a busybox layer"
            comparison.size = image.requested
            results.append(comparison)
    return results


# --- CRI pull ------------------------------------------------------------------------------


def push_plain(image: harness.LocalImage, registry: harness.Registry, work: Path,
               repository: str) -> harness.PushedImage:
    """Push the unencrypted image with skopeo (the harness pushes only encrypted ones)."""
    tag = uuid.uuid4().hex[:12]
    ref = f"{registry.host}/{repository}:{tag}"
    harness.run(["skopeo", "copy", "--quiet", "--policy", harness.policy_file(work),
                 "--dest-tls-verify=false", image.source, f"docker://{ref}"], timeout=600)
    manifest = registry.manifest(repository, tag)
    return harness.PushedImage(ref=ref, local=image, layers=list(manifest["layers"]))


def _wait_for_content_gone(node: harness.Node, digests: list[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        present = set(node.ctr("content", "ls", "-q").stdout.split())
        if not present & set(digests):
            return
        if time.monotonic() > deadline:
            raise BenchError("containerd kept the layer blobs after the image was removed")
        time.sleep(0.2)


def _forget(node: harness.Node, image: harness.PushedImage) -> None:
    """Remove the image and wait until its snapshots and blobs are gone (so the next pull
    fetches and unpacks everything again)."""
    with contextlib.suppress(Exception):
        if image.local.config_digest and node.cri is not None:
            node.remove_image(image)
    _wait_for_content_gone(node, image.layer_digests)
    if set(image.chain_ids) & node.snapshots():
        raise BenchError(f"snapshots of {image.ref} survived its removal")


def pull_run(node: harness.Node, image: harness.PushedImage) -> Callable[[], Sample]:
    def run() -> Sample:
        started = time.perf_counter()
        try:
            reported = node.pull(image.ref)
        except harness.PullFailed as e:
            raise WrongOutput(f"pull failed: {e.details[:500]}") from e
        wall = time.perf_counter() - started
        try:
            if reported != image.local.config_digest:
                raise WrongOutput(f"CRI reported {reported}, expected {image.local.config_digest}")
            missing = set(image.chain_ids) - node.snapshots()
            if missing:
                raise WrongOutput(f"no snapshot for {sorted(missing)} after the pull")
            files = node.read_image_files(image.ref, list(image.local.markers))
            if files != image.local.markers:
                raise WrongOutput("the unpacked image's marker file differs")
        finally:
            _forget(node, image)
        return Sample(wall)

    return run


def cri_comparisons(
    image: BenchImage, key: Keys, decoders: Mapping[str, Path], rounds: Rounds,
    progress: Progress,
) -> list[Comparison]:
    """Per decoder, a private containerd pulling the plain and the encrypted image in turn."""
    harness.require_tools()
    results = []
    local = image.local()
    # On tmpfs when there is one: the pulls then measure containerd's and the decoders' work,
    # not the disk's write-back of the snapshots earlier pulls created and removed, which
    # made each node slower than the one before.
    with harness.work_dir("pyimgcrypt-bench-cri-", parent=scratch_dir()) as work, \
            harness.Registry(work / "registry") as registry:
        plain = push_plain(local, registry, work, "bench/plain")
        encrypted = harness.encrypt_and_push(local, registry, "bench/encrypted", [key.public],
                                             work=work)
        for index, (label, decoder) in enumerate(decoders.items()):
            node = harness.Node(work / f"node{index}", decoder, registry.host, name=label)
            with node:
                harness.write_key_files(node.keys_dir, {"key.pem": key.private.read_bytes()})
                kind = "files" if image.label.endswith("-files") else "random"
                comparison = alternate(
                    f"CRI pull, {label}, {kind} image",
                    {"plain": pull_run(node, plain), "encrypted": pull_run(node, encrypted)},
                    warmup=rounds.warmup, runs=rounds.runs, progress=progress,
                )
                layer = (f"{size_label(image.requested)} of text-like files (gzip "
                         f"{size_label(image.plain_layers[1]['size'])})" if kind == "files"
                         else f"a {size_label(image.requested)} random file")
                comparison.note = f"busybox layer + a layer of {layer}"
                results.append(comparison)
    return results
