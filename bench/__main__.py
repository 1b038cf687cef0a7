"""`python -m bench`: run the benchmark suite and regenerate docs/performance.md.

    python -m bench                 full run (what `make bench` does), about 6 minutes on 2 cores
    python -m bench --quick         fewer runs, smaller images, no 1 GiB layer, ~1.5 minutes;
                                    its report goes into the cache directory unless
                                    --report-dir is given (so does that of an --only run)
    python -m bench --only startup,throughput --runs 9

Benchmarks: `throughput` (1, 16, 64, 256 MiB), `rss` (adds a 1 GiB layer), `startup` (~30 KB
layer, with `python -X importtime`), `encoder` (ctd-encoder against skopeo, when
the pip install has it), `cri` (CRI pulls through a private containerd; needs root).
Exit status 1 when a measured run gave a wrong result or a benchmark could not run; targets
that are missed are reported, not failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import harness

from bench import MIB, REPO_ROOT, data, measure, programs, report, suites
from bench.measure import BenchError, Comparison
from bench.suites import Rounds

BENCHMARKS = ("startup", "throughput", "rss", "encoder", "cri")
SMALL_LAYER = 30 * 1024


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short run for development")
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--warmup", type=int, help="uncounted rounds per comparison (>= 1)")
    parser.add_argument("--runs", type=int, help="counted rounds per comparison")
    parser.add_argument("--refdec", help="the reference decoder (default: $REFDEC, else the "
                        "integration harness's: $PYIMGCRYPT_REFDEC or its cached build of "
                        "the team's shared/reference/refdec)")
    parser.add_argument("--report-dir", type=Path,
                        help="where performance.md and throughput.png go (default: docs/ for a "
                        "full run of every benchmark, else the cache directory)")
    parser.add_argument("--no-bundle-rebuild", action="store_true",
                        help="use dist/ctd-decoder as it is even when older than the sources")
    parser.add_argument("--cri-mib", type=int, help="size of the CRI image's random layer")
    parser.add_argument("--patience", type=float, default=None,
                        help="seconds to wait before each comparison for other load on the "
                        "machine to drop below 0.3 cores (default 30, --quick 5; 0: never wait)")
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(args.only) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    if args.warmup is not None and args.warmup < 1:
        parser.error("--warmup must be at least 1")
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def say(text: str) -> None:
    print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    began = time.monotonic()
    # Programs containerd starts inherit our environment: no PYTHON* settings of a developer's
    # shell (PYTHONDONTWRITEBYTECODE would slow every Python start) reach them.
    for name in [n for n in os.environ if n.startswith("PYTHON")]:
        del os.environ[name]
    quick = args.quick
    measure.SETTLE["patience"] = args.patience if args.patience is not None else (
        5.0 if quick else 30.0)
    warmup = args.warmup or 1
    runs = args.runs or (3 if quick else 11)
    rounds = Rounds(warmup, runs)
    startup_rounds = Rounds(max(warmup, 2), args.runs or (9 if quick else 21))
    big_rounds = Rounds(warmup, min(runs, 5))
    slow_rounds = Rounds(warmup, args.runs or (3 if quick else 7))
    # CRI pulls swing most (containerd, the registry and gzip share the two cores) and their
    # target sits closest to what is measured, so they get as many rounds as throughput.
    cri_rounds = Rounds(warmup, args.runs or (3 if quick else 11))
    sizes = [1 * MIB, 16 * MIB, 64 * MIB, 256 * MIB]
    encoder_size = 64 * MIB if quick else 256 * MIB
    cri_size = (args.cri_mib or (16 if quick else 64)) * MIB
    cri_files_size = (32 if quick else 96) * MIB
    cache = data.cache_root()
    complete = not quick and set(args.only) == set(BENCHMARKS)
    report_dir = args.report_dir or (REPO_ROOT / "docs" if complete else cache)

    big = "" if quick else f"1 GiB {big_rounds.warmup} + {big_rounds.runs}; "
    r = report.Results(
        mode="quick" if quick else "full",
        command=" ".join(["python -m bench", *argv]),
        rounds=(f"{rounds.warmup} warm-up + {rounds.runs} counted rounds; small layer "
                f"{startup_rounds.warmup} + {startup_rounds.runs}; {big}encoder "
                f"{slow_rounds.warmup} + {slow_rounds.runs}; CRI {cri_rounds.warmup} + "
                f"{cri_rounds.runs}"),
        started=time.strftime("%Y-%m-%d %H:%M %Z"),
        machine=report.machine(),
        cri_size=cri_size,
        patience=measure.SETTLE["patience"],
    )
    r.machine["load average at start"] = report.load_average()
    say(f"bench: {r.mode} mode; cache {cache}; report into {report_dir}")
    try:
        refdec = programs.refdec(args.refdec, say)
        bundle = programs.bundle(not (args.no_bundle_rebuild or quick), say)
        programs.pip_install(say)
        key = data.keys(cache)
    except (BenchError, harness.HarnessError, OSError) as e:
        say(f"bench: cannot start: {e}")
        return 1
    decoders = {report.PIP: programs.PIP_DECODER, report.BUNDLE: bundle, report.REF: refdec}
    r.versions = programs.versions(refdec, bundle)

    def image(size: int, files: bool = False) -> data.BenchImage:
        return data.image(cache, size, key, say, files)

    def step(name: str, action: Callable[[], None]) -> None:
        try:
            action()
        except (BenchError, harness.HarnessError, harness.CommandFailed, OSError) as e:
            message = f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            say(f"bench: {message}")
            r.failures.append(message)
            r.skipped[name] = f"not measured: {message}"

    def note_errors(comparisons: list[Comparison]) -> None:
        r.failures.extend(f"{c.name}: {c.error}" for c in comparisons if c.error)

    if "startup" in args.only:
        def startup() -> None:
            small = image(SMALL_LAYER)
            say(f"bench: small layer ({small.size} bytes), {startup_rounds.runs} runs")
            r.startup = suites.decoders_comparison("small layer", small, key, decoders,
                                                   startup_rounds, say)
            r.floor = suites.python_floor(Rounds(startup_rounds.warmup, startup_rounds.runs), say)
            r.imports = suites.import_profile(small, key, 3 if quick else 7)
            note_errors([r.startup, r.floor])
            if r.imports.error:
                r.failures.append(f"importtime: {r.imports.error}")

        step("startup", startup)

    if "throughput" in args.only or "rss" in args.only:
        wanted = sizes if "throughput" in args.only else [MIB]
        if "rss" in args.only and not quick:
            wanted = [*wanted, 1024 * MIB]
        elif "rss" in args.only:
            say("bench: --quick leaves out the 1 GiB layer (peak RSS flatness not judged)")

        def throughput() -> None:
            for size in wanted:
                chosen = big_rounds if size >= 1024 * MIB else rounds
                layer = image(size)
                say(f"bench: throughput {data.size_label(size)}, {chosen.runs} runs")
                c = suites.decoders_comparison(f"throughput {data.size_label(size)}", layer, key,
                                               decoders, chosen, say)
                r.throughput[size] = c
                note_errors([c])

        step("throughput", throughput)

    if "encoder" in args.only:
        if not programs.ENCODER.exists():
            r.encoder_missing = True
            say(f"bench: encoder: not measured: {programs.ENCODER} is missing")
        else:
            def encoder() -> None:
                img = image(encoder_size)
                say(f"bench: encoder against skopeo, {img.label} image, {slow_rounds.runs} runs")
                r.encoder = suites.encoder_comparisons(img, key, refdec, slow_rounds, say)
                note_errors(r.encoder)

            step("encoder", encoder)

    if "cri" in args.only:
        problems = harness.missing_tools()
        if problems:
            r.skipped["cri"] = "not measured: missing " + "; ".join(problems)
            r.failures.append(r.skipped["cri"])
        else:
            def cri() -> None:
                r.cri = []
                # typical (text-like files, gzip ~3x) first, then the worst case for the
                # decoder: incompressible data, where its work is largest next to gzip's
                for img in (image(cri_files_size, files=True), image(cri_size)):
                    say(f"bench: CRI pulls, {img.label} image, {cri_rounds.runs} runs per node")
                    # refdec too: what the Go decoder costs in the same pull, for scale
                    found = suites.cri_comparisons(img, key, decoders, cri_rounds, say)
                    r.cri.extend(found)
                    note_errors(found)

            step("cri", cri)

    r.machine["load average at end"] = report.load_average()
    r.seconds = time.monotonic() - began
    text = report.render(r)
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "performance.md").write_text(text)
    plotted = report.plot(r, report_dir / "throughput.png")
    say("\n" + text)
    say(f"bench: wrote {report_dir / 'performance.md'}"
        + (f" and {report_dir / 'throughput.png'}" if plotted else "")
        + f" in {r.seconds / 60:.1f} minutes")
    return 1 if r.failures else 0


if __name__ == "__main__":
    sys.exit(main())
