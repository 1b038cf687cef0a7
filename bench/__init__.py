"""pyimgcrypt's benchmark suite (`make bench`, `python -m bench`): kept out of `make test`.

Measures the decoder side by side with the Go ocicrypt reference decoder (refdec), the encoder
side by side with skopeo, and a CRI pull of an encrypted image side by side with the same image
unencrypted. Every comparison alternates its variants in the same run, after warm-up rounds,
and checks each measured run's output, so a fast but wrong program cannot score.

Modules: `measure` (spawning a program and taking its wall time, CPU time and peak RSS;
alternation; statistics), `data` (keys and skopeo-encrypted images, made once in a cache
directory outside the repository and verified on reuse), `suites` (the five benchmarks),
`report` (machine and versions, docs/performance.md, docs/throughput.png).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024

# The integration harness (integration/harness.py, imported as `harness`) and the test
# support module (`tests.support`) are reused, not copied.
for _path in (REPO_ROOT / "integration", REPO_ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
