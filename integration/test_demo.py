"""`make demo`, run by the test suite: a broken demo fails `make test`.

Owns the demo's promise (README): on this machine it encrypts an image, pulls and runs it
through CRI with our decoder, shows the refusal on a node without the key, and leaves nothing
behind. The command is the Makefile's own `demo` recipe (read with `make -n`, without its
`deps` prerequisite, which `make test` has already run), executed as make executes it: by
the Makefile's SHELL, from the repository root.
"""

from __future__ import annotations

import re
from pathlib import Path

import demo
import harness
import pytest

pytestmark = pytest.mark.integration

DEMO_TIMEOUT = 300  # seconds; the demo takes a few seconds once `make deps` has run


def demo_recipe() -> str:
    """The shell line `make demo` runs after its prerequisites."""
    result = harness.run(["make", "--no-print-directory", "-s", "-n", "-o", "deps", "demo"],
                         cwd=harness.REPO_ROOT, timeout=60)
    lines = result.stdout.splitlines()
    assert len(lines) == 1, f"`make -n demo` printed more than the demo recipe:\n{result.stdout}"
    assert lines[0].endswith(" integration/demo.py"), lines[0]
    return lines[0]


def leftover_processes(marker: str) -> list[str]:
    """Command lines of running processes that mention `marker` (the demo's work directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                    errors="replace")
            except OSError:
                continue
            if marker in argv:
                found.append(f"{entry.name}: {argv}")
    return found


def test_make_demo() -> None:
    recipe = demo_recipe()
    result = harness.run(["/bin/bash", "-c", recipe], cwd=harness.REPO_ROOT,
                         timeout=DEMO_TIMEOUT, check=False)
    output = result.stdout
    report = f"--- stdout ---\n{output}\n--- stderr ---\n{result.stderr}"
    assert result.returncode == 0, report
    assert "demo failed" not in result.stderr, report
    steps = re.findall(r"^\[(\d+)/(\d+)\] ", output, re.MULTILINE)
    assert steps == [(str(n), "10") for n in range(1, 11)], report
    # step 5: what the registry holds is ciphertext
    assert "(not gzip: it is ciphertext)" in output, report
    # step 8: the container's output line
    assert f"\n      the container printed: {demo.GREETING.strip()}\n" in output, report
    # step 9: the refusal on the node without the key names the layer ctd-encoder encrypted
    # and the key it tried (the narration wraps the decoder's line, so compare unwrapped)
    encrypted = re.search(r" encrypted as (sha256:[0-9a-f]{64}) for jwe:", output)
    assert encrypted, report
    flat = " ".join(output.split())
    refusal = (f"the pull failed, and containerd passed on the decoder's message: "
               f"{harness.DECODER_MESSAGE_PREFIX}{harness.NO_KEY_MESSAGE}{encrypted[1]};")
    assert refusal in flat, report
    assert re.search(r"node-without-key/keys/key\.pem \(EC P-256\); the layer is wrapped for: "
                     r"JWE \(1 recipient: RSA-OAEP ", flat), report
    assert "images on that node: 0; snapshots of the image: 0" in output, report
    assert output.rstrip().endswith(
        "Demo complete: the encrypted image ran on the node with the key and was refused,\n"
        "with a clear message, on the node without it."), report
    # step 10: everything it started is gone, with its work directory
    config = re.search(r"^ +config: +(\S+)/node/config\.toml$", output, re.MULTILINE)
    assert config, report
    work = Path(config[1])
    assert work.name.startswith("pyimgcrypt-demo-"), report
    assert not work.exists(), f"the demo left {work} behind"
    assert not leftover_processes(str(work)), leftover_processes(str(work))
