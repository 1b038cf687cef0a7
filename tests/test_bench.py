"""The benchmark suite's measuring core (`bench/`): a wrong or failed run never scores, the
payload reaches fd 3, order rotates, ratios pair runs of the same round."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bench import measure, suites
from bench.measure import Sample, WrongOutput


def test_spawn_feeds_stdin_and_fd3_and_hashes_stdout(tmp_path: Path) -> None:
    source = tmp_path / "in"
    source.write_bytes(b"layer bytes" * 1000)
    script = "import os,sys; sys.stdout.buffer.write(sys.stdin.buffer.read() + os.read(3, 100))"
    run = measure.spawn([sys.executable, "-c", script], stdin=source, payload=b"<payload>")
    expected = source.read_bytes() + b"<payload>"
    sample = measure.expect_output(run, "sha256:" + hashlib.sha256(expected).hexdigest(),
                                   len(expected))
    assert sample.wall > 0 and sample.cpu is not None and sample.cpu > 0
    assert sample.maxrss is not None and sample.maxrss > 1024 * 1024


def test_a_run_with_other_output_or_a_failure_does_not_score(tmp_path: Path) -> None:
    wrong = measure.spawn([sys.executable, "-c", "print('garbage')"])
    with pytest.raises(WrongOutput, match="wrote 8 bytes"):
        measure.expect_output(wrong, "sha256:" + hashlib.sha256(b"expected\n").hexdigest())
    failed = measure.spawn([sys.executable, "-c", "import sys; sys.exit('no key')"])
    with pytest.raises(WrongOutput, match="exit status 1; stderr: no key"):
        measure.expect_success(failed)


@pytest.mark.parametrize("size", [5, measure.READ_CHUNK, 3 * measure.READ_CHUNK + 7])
def test_spawn_compares_stdout_with_a_reference_file(tmp_path: Path, size: int) -> None:
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    source = tmp_path / "in"
    source.write_bytes(data)
    copy = [sys.executable, "-c", "import shutil,sys; shutil.copyfileobj(sys.stdin.buffer, "
            "sys.stdout.buffer, 65536)"]
    run = measure.spawn(copy, stdin=source, reference=source)
    assert run.stdout_size == size and run.stdout_differs_at is None
    measure.expect_same_output(run, source)
    for name, wrong in [("flipped", data[:-3] + bytes([data[-3] ^ 1]) + data[-2:]),
                        ("short", data[:-1]), ("long", data + b"!")]:
        other = tmp_path / name
        other.write_bytes(wrong)
        bad = measure.spawn(copy, stdin=other, reference=source)
        expected_offset = {"flipped": size - 3, "short": size - 1, "long": size}[name]
        assert bad.stdout_differs_at == expected_offset, name
        with pytest.raises(WrongOutput, match=f"differ from .* at offset {expected_offset}"):
            measure.expect_same_output(bad, source)


def test_a_rewritten_reference_file_is_compared_as_it_is_now(tmp_path: Path) -> None:
    """The reader maps each reference once; a file written anew is mapped anew."""
    source = tmp_path / "in"
    source.write_bytes(b"first version\n")
    copy = [sys.executable, "-c", "import shutil,sys; shutil.copyfileobj(sys.stdin.buffer, "
            "sys.stdout.buffer)"]
    assert measure.spawn(copy, stdin=source, reference=source).stdout_differs_at is None
    other = tmp_path / "other"
    other.write_bytes(b"first version\n")
    source.write_bytes(b"later version, longer\n")
    os.utime(source, ns=(1, 1))  # a different mtime even on a coarse clock
    assert measure.spawn(copy, stdin=source, reference=source).stdout_differs_at is None
    assert measure.spawn(copy, stdin=other, reference=source).stdout_differs_at == 0


def test_alternate_rotates_and_stops_at_the_first_wrong_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(measure.SETTLE, "patience", 0)  # no waiting for a quiet machine
    calls: list[str] = []

    def variant(name: str, fail_at: int | None = None) -> Callable[[], Sample]:
        def run() -> Sample:
            calls.append(name)
            if fail_at is not None and calls.count(name) == fail_at:
                raise WrongOutput(f"{name} printed garbage")
            return Sample(wall=float(len(calls)))
        return run

    good = measure.alternate("c", {"a": variant("a"), "b": variant("b")}, warmup=1, runs=3)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert good.ok and len(good.samples["a"]) == 3
    # a sample's wall is the call's position: counted rounds are calls 3-8
    assert [s.wall for s in good.samples["a"]] == [4.0, 5.0, 8.0]
    assert good.ratios("a", "b") == [4.0 / 3.0, 5.0 / 6.0, 8.0 / 7.0]
    calls.clear()
    bad = measure.alternate("c", {"a": variant("a"), "b": variant("b", fail_at=2)},
                            warmup=1, runs=3)
    assert not bad.ok and bad.error is not None and "b printed garbage" in bad.error


def test_ratios_pair_runs_of_the_same_round() -> None:
    c = measure.Comparison("c", ["ours", "ref"], {
        "ours": [Sample(1.0), Sample(4.0), Sample(2.0)],
        "ref": [Sample(2.0), Sample(2.0), Sample(8.0)],
    })
    assert c.ratios("ours", "ref") == [0.5, 2.0, 0.25]
    assert c.ratio("ours", "ref").median == 0.5
    assert c.wall("ours") == measure.Stats(2.0, 1.0, 4.0)


def test_throughput_verdict_counts_the_rounds_that_reach_the_target() -> None:
    from bench import report

    walls = {report.REF: [3.0, 3.0, 3.0, 3.0], report.PIP: [1.0, 2.5, 1.9, 2.1],
             report.BUNDLE: [2.5, 2.5, 2.5, 1.0]}
    big = measure.Comparison("throughput 256 MiB", list(walls),
                             {name: [Sample(w) for w in ws] for name, ws in walls.items()},
                             size=report.THROUGHPUT_SIZE)
    results = report.Results(mode="full", command="", rounds="", started="",
                             throughput={report.THROUGHPUT_SIZE: big})
    pip, bundle = [v for v in report.verdicts(results) if v.target.startswith("throughput")]
    assert pip.passed is True and "2 of 4 rounds >= 1.5x" in pip.measured  # 3.0, 1.2, 1.58, 1.43
    assert bundle.passed is False and "1 of 4 rounds >= 1.5x" in bundle.measured


def test_parse_importtime_sums_self_times_and_ranks_top_level_imports() -> None:
    stderr = "\n".join([
        "import time: self [us] | cumulative | imported package",
        "import time:       100 |        100 |   _codecs",
        "import time:       200 |        300 | codecs",
        "import time:        50 |         50 |     cryptography.x",
        "import time:       400 |        450 |   cryptography",
        "import time:        10 |        460 | decoder.decode",
        "ctd-decoder: not an import line",
    ])
    total, top, packages = suites.parse_importtime(stderr)
    assert total == 760
    assert top == {"codecs": 300, "decoder.decode": 460}
    assert packages == {"_codecs": 100, "codecs": 200, "cryptography": 450, "decoder": 10}
