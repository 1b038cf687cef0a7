"""Test support for the encoder: OCI image layouts and archives built directly from bytes
(independently of the code under test), and readers for what the encoder wrote."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
TAR = "application/vnd.oci.image.layer.v1.tar"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
REF = "org.opencontainers.image.ref.name"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Layer:
    data: bytes
    media_type: str = GZIP
    annotations: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def descriptor(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": digest(self.data),
                             "size": len(self.data)}
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        d.update(self.extra)
        return d


class LayoutBuilder:
    """Writes blobs into an OCI layout directory and index.json entries for them."""

    def __init__(self, root: Path):
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self.entries: list[dict[str, Any]] = []
        if (root / "index.json").exists():
            self.entries = json.loads((root / "index.json").read_text())["manifests"]

    def blob(self, data: bytes) -> str:
        d = digest(data)
        (self.root / "blobs" / "sha256" / d.split(":")[1]).write_bytes(data)
        return d

    def json_blob(self, value: Any, media_type: str) -> dict[str, Any]:
        data = json.dumps(value).encode()
        return {"mediaType": media_type, "digest": self.blob(data), "size": len(data)}

    def manifest(
        self, layers: list[Layer], *, arch: str = "amd64", docker: bool = False,
        annotations: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        config = {"architecture": arch, "os": "linux",
                  "rootfs": {"type": "layers", "diff_ids": [digest(la.data) for la in layers]}}
        config_descriptor = self.json_blob(config, DOCKER_CONFIG if docker else OCI_CONFIG)
        for layer in layers:
            self.blob(layer.data)
        body: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
            "config": config_descriptor,
            "layers": [layer.descriptor() for layer in layers],
        }
        if annotations:
            body["annotations"] = annotations
        return self.json_blob(body, DOCKER_MANIFEST if docker else OCI_MANIFEST)

    def index(self, manifests: list[tuple[dict[str, Any], str]]) -> dict[str, Any]:
        children = []
        for descriptor, platform in manifests:
            os_name, arch, *variant = platform.split("/")
            fields = {"architecture": arch, "os": os_name}
            if variant:
                fields["variant"] = variant[0]
            children.append({**descriptor, "platform": fields})
        return self.json_blob({"schemaVersion": 2, "mediaType": OCI_INDEX,
                               "manifests": children}, OCI_INDEX)

    def add(self, descriptor: dict[str, Any], ref: str | None = "latest",
            annotations: dict[str, str] | None = None) -> None:
        entry = dict(descriptor)
        entry_annotations = dict(annotations or {})
        if ref is not None:
            entry_annotations[REF] = ref
        if entry_annotations:
            entry["annotations"] = entry_annotations
        self.entries.append(entry)
        (self.root / "index.json").write_text(
            json.dumps({"schemaVersion": 2, "manifests": self.entries})
        )


def simple_image(root: Path, layers: list[Layer], ref: str | None = "latest",
                 **kwargs: Any) -> LayoutBuilder:
    builder = LayoutBuilder(root)
    builder.add(builder.manifest(layers, **kwargs), ref)
    return builder


def random_layers(count: int, size: int = 3000, media_type: str = GZIP) -> list[Layer]:
    return [Layer(os.urandom(size + i), media_type) for i in range(count)]


def to_archive(layout: Path, archive: Path) -> None:
    with tarfile.open(archive, "w") as tar:
        for path in sorted(layout.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(layout)), recursive=False)


class Reader:
    """Reads an OCI layout directory (or an extracted archive) the encoder wrote."""

    def __init__(self, root: Path):
        self.root = root
        self.index = json.loads((root / "index.json").read_text())

    def blob(self, d: str) -> bytes:
        data = (self.root / "blobs" / "sha256" / d.split(":")[1]).read_bytes()
        assert digest(data) == d, f"blob {d} does not match its digest"
        return data

    def json(self, d: str) -> Any:
        return json.loads(self.blob(d))

    def entry(self, ref: str | None = "latest") -> dict[str, Any]:
        found = [e for e in self.index["manifests"] if e.get("annotations", {}).get(REF) == ref]
        assert len(found) == 1, self.index
        return dict(found[0])

    def manifest(self, ref: str | None = "latest") -> dict[str, Any]:
        entry = self.entry(ref)
        manifest = self.json(entry["digest"])
        assert len(self.blob(entry["digest"])) == entry["size"]
        return dict(manifest)

    def check_complete(self) -> None:
        """Every descriptor reachable from index.json names a present blob of that size."""
        def visit(descriptor: dict[str, Any]) -> None:
            data = self.blob(descriptor["digest"])
            assert len(data) == descriptor["size"]
            if descriptor["mediaType"] in (OCI_INDEX,):
                for child in json.loads(data)["manifests"]:
                    visit(child)
            elif descriptor["mediaType"] in (OCI_MANIFEST, DOCKER_MANIFEST):
                body = json.loads(data)
                visit(body["config"])
                for layer in body["layers"]:
                    visit(layer)
        for entry in self.index["manifests"]:
            visit(entry)


def tree_state(root: Path) -> dict[str, str]:
    """Every file under root with its content digest (to prove nothing changed)."""
    return {str(p.relative_to(root)): digest(p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}
