"""The report: machine and versions, tables with PASS/FAIL against the issue's targets, the
throughput plot, and a "where we are behind, and why" section written from the numbers.

`render` returns the Markdown of docs/performance.md; `plot` writes docs/throughput.png.
Targets (2-core machine): decoder throughput at 256 MiB >= 1.5x the reference's; a ~30 KB
layer in <= 100 ms (pip entry point) and <= 150 ms (PyInstaller bundle); peak RSS <= 48 MiB
and flat (1 GiB within 4 MiB of 1 MiB); encoder >= 3x skopeo, encrypting and decrypting; a CRI
pull of the encrypted image <= 1.15x the plain one (an image of text-like files; the image of
incompressible data is reported as a stress case, beside the Go decoder on the same pulls).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

from bench import MIB
from bench.data import size_label
from bench.measure import Comparison, Stats
from bench.suites import ImportProfile

PIP = "ours (pip)"
BUNDLE = "ours (bundle)"
REF = "refdec"
OURS = (PIP, BUNDLE)

THROUGHPUT_SIZE = 256 * MIB
THROUGHPUT_TARGET = 1.5
STARTUP_TARGETS = {PIP: 0.100, BUNDLE: 0.150}
RSS_LIMIT = 48 * MIB
RSS_FLAT = 4 * MIB
ENCODER_TARGET = 3.0
CRI_TARGET = 1.15

# Single-core rates on this kind of machine (shared/reference/field-notes.md, `openssl speed`),
# used only to explain the numbers.
HASH_RATE = 1.4e9
AES_RATE = 6.0e9
# Two SHA-256 streams interleaved on one core (decoder._sha256pair) against one after the
# other: 2.9 against 1.7 GB/s on this kind of machine (measured when it was written).
PAIR_SPEEDUP = 1.7


@dataclass
class Results:
    """Everything one run of the suite measured."""

    mode: str
    command: str
    rounds: str
    started: str
    seconds: float = 0.0
    machine: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    throughput: dict[int, Comparison] = field(default_factory=dict)
    startup: Comparison | None = None
    floor: Comparison | None = None
    imports: ImportProfile | None = None
    encoder: list[Comparison] | None = None
    encoder_missing: bool = False
    cri: list[Comparison] | None = None
    cri_size: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    patience: float = 0.0  # seconds each comparison waited at most for a quiet machine


@dataclass(frozen=True)
class Verdict:
    target: str
    goal: str
    measured: str
    passed: bool | None  # None: not measured

    @property
    def result(self) -> str:
        return {True: "PASS", False: "FAIL", None: "not measured"}[self.passed]


# --- machine -------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    info: dict[str, str] = {}
    cpuinfo = _read("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
              if line.startswith("model name")]
    flags_line = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    flags = set(flags_line.split(":", 1)[-1].split())
    info["CPU"] = models[0] if models else platform.processor() or "unknown"
    info["cores"] = f"{os.cpu_count()} ({len(os.sched_getaffinity(0))} usable)"
    wanted = ["aes", "vaes", "sha_ni", "avx2", "avx512f"]
    info["crypto flags"] = " ".join(f for f in wanted if f in flags) or "none"
    mem = next((line.split()[1] for line in _read("/proc/meminfo").splitlines()
                if line.startswith("MemTotal:")), "0")
    info["memory"] = f"{int(mem) / 1024 / 1024:.1f} GiB"
    info["kernel"] = platform.release()
    os_release = dict(
        line.split("=", 1) for line in _read("/etc/os-release").splitlines() if "=" in line
    )
    info["OS"] = os_release.get("PRETTY_NAME", "unknown").strip('"')
    return info


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


# --- formatting ----------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def secs(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.3f} s"


def spread(stats: Stats) -> str:
    return f"{secs(stats.median)} ({secs(stats.minimum)}-{secs(stats.maximum)})"


def mib(value: float) -> str:
    return f"{value / MIB:.1f} MiB"


def gbps(size: int, seconds: float) -> float:
    return size / seconds / 1e9


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def size_of(comparison: Comparison) -> int:
    return comparison.size


# --- verdicts ------------------------------------------------------------------------------


def speed_ratio(comparison: Comparison, ours: str, theirs: str) -> Stats:
    """Per round, theirs' wall time / ours' wall time (> 1: ours is faster); median etc."""
    return comparison.ratio(theirs, ours)


def verdicts(r: Results) -> list[Verdict]:
    out: list[Verdict] = []
    big = r.throughput.get(THROUGHPUT_SIZE)
    for variant in OURS:
        target = f"throughput 256 MiB, {variant}"
        goal = f">= {THROUGHPUT_TARGET}x refdec"
        if big is None or not big.ok or variant not in big.variants:
            out.append(Verdict(target, goal, _why_missing(big), None))
            continue
        ratio = speed_ratio(big, variant, REF).median
        rate = gbps(size_of(big), big.wall(variant).median)
        # How many rounds reach the target says how firmly the median does.
        rounds = big.ratios(REF, variant)
        reached = sum(r >= THROUGHPUT_TARGET for r in rounds)
        out.append(Verdict(target, goal, f"{_ratio_text(ratio)}x ({rate:.2f} GB/s vs "
                           f"{gbps(size_of(big), big.wall(REF).median):.2f}; "
                           f"{reached} of {len(rounds)} rounds >= {THROUGHPUT_TARGET}x)",
                           ratio >= THROUGHPUT_TARGET))
    for variant, limit in STARTUP_TARGETS.items():
        target = f"~30 KB layer, {variant}"
        goal = f"median <= {limit * 1000:.0f} ms"
        s = r.startup
        if s is None or not s.ok:
            out.append(Verdict(target, goal, _why_missing(s), None))
            continue
        median = s.wall(variant).median
        out.append(Verdict(target, goal, f"{ms(median)} (refdec {ms(s.wall(REF).median)})",
                           median <= limit))
    sizes = sorted(size for size, c in r.throughput.items() if c.ok)
    for variant in OURS:
        target = f"peak RSS, {variant}"
        goal = f"<= {RSS_LIMIT // MIB} MiB, flat 1 MiB to 1 GiB"
        rss = {size: _rss(r.throughput[size], variant) for size in sizes}
        if MIB not in rss or 1024 * MIB not in rss:
            out.append(Verdict(target, goal, "needs the 1 MiB and 1 GiB runs", None))
            continue
        worst = max(rss.values())
        growth = rss[1024 * MIB] - rss[MIB]
        out.append(Verdict(target, goal,
                           f"max {mib(worst)}; 1 GiB vs 1 MiB: {growth / MIB:+.1f} MiB",
                           worst <= RSS_LIMIT and growth <= RSS_FLAT))
    for name in ("encoder encrypt", "encoder decrypt"):
        goal = f">= {ENCODER_TARGET}x skopeo"
        found = [c for c in r.encoder or [] if c.name == name]
        if found and found[0].size:
            name = f"{name}, {size_label(found[0].size)} layer"
        if r.encoder_missing:
            out.append(Verdict(name, goal, "not measured: encoder missing", None))
        elif not found or not found[0].ok:
            out.append(Verdict(name, goal, _why_missing(found[0] if found else None), None))
        else:
            c = found[0]
            ratio = speed_ratio(c, "ctd-encoder", "skopeo").median
            out.append(Verdict(name, goal, f"{ratio:.2f}x ({secs(c.wall('ctd-encoder').median)} "
                               f"vs {secs(c.wall('skopeo').median)})", ratio >= ENCODER_TARGET))
    for c in r.cri or []:
        goal = f"encrypted <= {CRI_TARGET}x plain"
        if _cri_node(c) == REF or _is_stress(c):
            continue  # for scale, and the stress case: see stress_rows
        if not c.ok:
            out.append(Verdict(c.name, goal, _why_missing(c), None))
            continue
        ratio = c.ratio("encrypted", "plain").median
        out.append(Verdict(c.name, goal, f"{ratio:.2f}x ({secs(c.wall('encrypted').median)} vs "
                           f"{secs(c.wall('plain').median)})", ratio <= CRI_TARGET))
    if r.cri is None:
        out.append(Verdict("CRI pull", f"encrypted <= {CRI_TARGET}x plain",
                           r.skipped.get("cri", "not run"), None))
    return out


def _ratio_text(ratio: float) -> str:
    """Two decimals, or three where two would round onto a target it misses or meets."""
    shown = f"{ratio:.2f}"
    targets = (THROUGHPUT_TARGET, ENCODER_TARGET, CRI_TARGET)
    return f"{ratio:.3f}" if any(float(shown) == t != ratio for t in targets) else shown


def _why_missing(c: Comparison | None) -> str:
    if c is None:
        return "not run"
    return f"no result: {c.error}" if c.error else "no result"


def _rss(c: Comparison, variant: str) -> float:
    stats = c.maxrss(variant)
    return stats.median if stats else 0.0


# --- sections ------------------------------------------------------------------------------


def throughput_section(r: Results) -> str:
    rows = []
    for size in sorted(r.throughput):
        c = r.throughput[size]
        for variant in c.variants:
            if not c.samples.get(variant):
                rows.append([size_label(size), variant, "—", "—", "—", "—", "—"])
                continue
            wall = c.wall(variant)
            cpu = c.cpu(variant)
            vs = ("1.00x" if variant == REF or REF not in c.variants
                  else f"{speed_ratio(c, variant, REF).median:.2f}x")
            rows.append([
                size_label(size), variant, spread(wall),
                f"{gbps(size_of(c), wall.median):.3f}",
                secs(cpu.median) if cpu else "—",
                mib(_rss(c, variant)), vs,
            ])
        if c.error:
            rows.append([size_label(size), "**error**", c.error, "", "", "", ""])
    runs = {size: len(next(iter(c.samples.values()), [])) for size, c in r.throughput.items()}
    text = table(["layer", "decoder", "wall median (min-max)", "GB/s", "CPU", "peak RSS",
                  "speed vs refdec"], rows)
    counts = ", ".join(f"{size_label(s)}: {n}" for s, n in sorted(runs.items()))
    return (
        "Whole process, stdin from a file (page-cached), payload on fd 3 through a pipe, stdout "
        "into a pipe that the same reader drains for every decoder. GB/s = layer bytes / wall "
        "time. *speed vs refdec* is the median over rounds of refdec's wall time divided by "
        f"ours in the same round (> 1: ours is faster). Counted runs per decoder: {counts}.\n\n"
        + text + "\n\n![throughput against layer size](throughput.png)\n"
    )


def startup_section(r: Results) -> str:
    s = r.startup
    if s is None:
        return "Not run.\n"
    rows = []
    for variant in s.variants:
        if not s.samples.get(variant):
            continue
        cpu = s.cpu(variant)
        vs = "—" if variant == REF else f"{s.ratio(variant, REF).median:.2f}x"
        limit = STARTUP_TARGETS.get(variant)
        verdict = ("—" if limit is None else
                   "PASS" if s.wall(variant).median <= limit else "FAIL")
        rows.append([variant, spread(s.wall(variant)), secs(cpu.median) if cpu else "—",
                     mib(_rss(s, variant)), vs,
                     f"<= {limit * 1000:.0f} ms: {verdict}" if limit else "—"])
    if r.floor is not None and r.floor.ok:
        f = r.floor
        cpu = f.cpu("python -c pass")
        rows.append(["python -c pass (venv, for scale)", spread(f.wall("python -c pass")),
                     secs(cpu.median) if cpu else "—", mib(_rss(f, "python -c pass")), "—", "—"])
    if s.error:
        rows.append(["**error**", s.error, "", "", "", ""])
    size = size_of(s)
    text = (f"A {size / 1000:.0f} KB layer ({size} bytes) encrypted by skopeo, whole process; "
            f"{len(next(iter(s.samples.values()), []))} counted runs each. *time vs refdec* is "
            "the median per-round ratio of wall times (how many times longer ours takes).\n\n")
    text += table(["decoder", "wall median (min-max)", "CPU", "peak RSS", "time vs refdec",
                   "target"], rows) + "\n"
    p = r.imports
    if p is not None:
        if p.error:
            text += f"\n`python -X importtime`: failed: {p.error}\n"
        else:
            text += (f"\n`python -X importtime` of the pip entry point on this layer (median of "
                     f"{p.runs} runs): {p.total_ms:.1f} ms of imports in all. Heaviest top-level "
                     "imports (cumulative, children included):\n\n")
            text += table(["module", "cumulative"],
                          [[f"`{m}`", f"{t:.1f} ms"] for m, t in p.top_level[:10]]) + "\n"
            text += ("\nThe same imports by top-level package (self times summed, so every "
                     "module counts once):\n\n")
            text += table(["package", "self time"],
                          [[f"`{m}`", f"{t:.1f} ms"] for m, t in p.by_package[:10]]) + "\n"
    return text


def rss_section(r: Results) -> str:
    sizes = sorted(r.throughput)
    if not sizes:
        return "Not run.\n"
    variants = [v for v in (PIP, BUNDLE, REF) if any(v in r.throughput[s].variants
                                                     for s in sizes)]
    rows = []
    for variant in variants:
        row = [variant]
        for size in sizes:
            c = r.throughput[size]
            row.append(mib(_rss(c, variant)) if c.samples.get(variant) else "—")
        rows.append(row)
    return ("Median peak RSS (`ru_maxrss` of the whole process from `wait4`) in the throughput "
            f"runs. Target for ours: <= {RSS_LIMIT // MIB} MiB at every size, and the 1 GiB "
            f"layer within {RSS_FLAT // MIB} MiB of the 1 MiB one.\n\n"
            + table(["decoder", *[size_label(s) for s in sizes]], rows) + "\n")


def encoder_section(r: Results) -> str:
    if r.encoder_missing:
        return "not measured: the pip install has no `ctd-encoder`.\n"
    if r.encoder is None:
        return r.skipped.get("encoder", "Not run.") + "\n"
    rows = []
    for c in r.encoder:
        for variant in c.variants:
            if not c.samples.get(variant):
                continue
            cpu = c.cpu(variant)
            vs = "—" if variant == "skopeo" else f"{speed_ratio(c, variant, 'skopeo').median:.2f}x"
            rows.append([c.name, variant, spread(c.wall(variant)),
                         secs(cpu.median) if cpu else "—", mib(_rss(c, variant)), vs])
        if c.error:
            rows.append([c.name, "**error**", c.error, "", "", ""])
    note = r.encoder[0].note if r.encoder else ""
    return (f"Whole image ({note}), OCI layout to OCI layout on tmpfs; `skopeo copy "
            "--encryption-key jwe:PUB` / `--decryption-key KEY` against `ctd-encoder encrypt "
            "--recipient jwe:PUB` / `decrypt --key KEY`. Each output is checked after the run: "
            "encrypted layers must decrypt (reference decoder) to the original, decrypted ones "
            "must equal the original. *speed vs skopeo*: median per-round skopeo time / ours.\n\n"
            + table(["operation", "program", "wall median (min-max)", "CPU", "peak RSS",
                     "speed vs skopeo"], rows) + "\n")


def _is_stress(c: Comparison) -> bool:
    """The incompressible image: where a decoder's per-byte work weighs most next to gzip's.
    Reported beside the Go decoder, not held to the target, which is for an image."""
    return c.name.endswith("random image")


def _go_twin(r: Results, c: Comparison) -> Comparison | None:
    """The refdec node's comparison on the same image as `c`."""
    return next((g for g in r.cri or [] if _cri_node(g) == REF and g.ok
                 and g.name.rsplit(", ", 1)[-1] == c.name.rsplit(", ", 1)[-1]), None)


def stress_rows(r: Results) -> list[list[str]]:
    rows = []
    for c in r.cri or []:
        if not _is_stress(c) or not c.ok:
            continue
        rows.append([_cri_node(c), f"{c.ratio('encrypted', 'plain').median:.2f}x",
                     f"{secs(c.wall('encrypted').median)} vs {secs(c.wall('plain').median)}"])
    return rows


def _cri_node(c: Comparison) -> str:
    """The decoder a CRI comparison's node ran: its name is "CRI pull, NODE, KIND image"."""
    return c.name.split(", ")[1] if c.name.count(", ") >= 2 else ""


def cri_section(r: Results) -> str:
    if r.cri is None:
        return r.skipped.get("cri", "Not run.") + "\n"
    rows = []
    for c in r.cri:
        for variant in c.variants:
            if c.samples.get(variant):
                vs = "—" if variant == "plain" else f"{c.ratio(variant, 'plain').median:.2f}x"
                rows.append([c.name, variant, spread(c.wall(variant)), vs])
        if c.error:
            rows.append([c.name, "**error**", c.error, ""])
    images = sorted({f"*{c.name.rsplit(', ', 1)[-1]}*: {c.note}" for c in r.cri if c.note})
    return ("CRI `PullImage` (pull and unpack) through a private containerd 1.6 with overlayfs, "
            f"from a registry on 127.0.0.1; images ({'; '.join(images)}), both layers "
            "encrypted in the encrypted one. Between runs the image is removed "
            "and the suite waits until containerd has collected its snapshots and blobs, so "
            "every pull fetches and unpacks everything again. The refdec node (the Go ocicrypt "
            "decoder) is there for scale. *time vs plain*: median per-round ratio.\n\n"
            + table(["node", "image", "wall median (min-max)", "time vs plain"], rows) + "\n")


def all_comparisons(r: Results) -> list[Comparison]:
    found = [r.startup, r.floor, *[r.throughput[s] for s in sorted(r.throughput)],
             *(r.encoder or []), *(r.cri or [])]
    return [c for c in found if c is not None]


NOISY = 0.25  # cores of other load (or steal) above which a comparison is called noisy


def noise_section(r: Results) -> str:
    rows = []
    for c in all_comparisons(r):
        if c.noise is None:
            continue
        name = c.name + (" (containerd, the registry and their decoders count as other)"
                         if c.name.startswith("CRI") else "")
        rows.append([name, secs(c.seconds), f"{c.noise.other:.2f}", f"{c.noise.steal:.2f}"])
    if not rows:
        return "Not measured.\n"
    return ("CPU the rest of the machine used while each comparison ran, in cores averaged "
            "over its duration (2 cores in all): *other* is the machine's busy time from "
            "/proc/stat minus the suite's own and its measured programs', *steal* what the "
            "hypervisor gave to other guests. Before each comparison the suite waited up to "
            f"{r.patience:.0f} s for the rest of the machine to use less than 0.3 cores.\n\n"
            + table(["comparison", "duration", "other (cores)", "steal (cores)"], rows) + "\n")


# --- analysis ------------------------------------------------------------------------------


def analysis(r: Results, found: list[Verdict]) -> str:
    """Plain statements from the numbers: what is behind, by how much, and what explains it."""
    parts: list[str] = []
    noisy = [(c.name, c.noise) for c in all_comparisons(r)
             if c.noise is not None and not c.name.startswith("CRI")
             and c.noise.other + c.noise.steal >= NOISY]
    if noisy:
        name, worst = max(noisy, key=lambda item: item[1].other + item[1].steal)
        parts.append(
            f"**Noise**: other load during {len(noisy)} of the comparisons (worst: "
            f"{name}, {worst.other:.2f} cores busy elsewhere and "
            f"{worst.steal:.2f} stolen by the hypervisor, of 2). Absolute times there "
            "are inflated; the ratios, from runs made side by side under the same load, hold "
            "up better. See *Noise* below."
        )
    big = r.throughput.get(THROUGHPUT_SIZE)
    startup = r.startup if r.startup is not None and r.startup.ok else None
    if big is not None and big.ok:
        size = size_of(big)
        for variant in OURS:
            if variant not in big.variants:
                continue
            wall = big.wall(variant).median
            cpu = big.cpu(variant)
            ref_wall = big.wall(REF).median
            ref_cpu = big.cpu(REF)
            ratio = speed_ratio(big, variant, REF).median
            text = (f"**Throughput ({variant})**: {gbps(size, wall):.2f} GB/s at 256 MiB against "
                    f"refdec's {gbps(size, ref_wall):.2f} GB/s, {_ratio_text(ratio)}x "
                    f"({'meets' if ratio >= THROUGHPUT_TARGET else 'below'} the "
                    f"{THROUGHPUT_TARGET}x target).")
            if cpu is not None and ref_cpu is not None:
                text += (f" Ours burns {cpu.median / size * 1e9:.2f} CPU-s per GB with "
                         f"{cpu.median / wall:.2f} cores busy on average; refdec "
                         f"{ref_cpu.median / size * 1e9:.2f} CPU-s per GB on "
                         f"{ref_cpu.median / ref_wall:.2f} cores.")
            if startup is not None and variant in startup.variants:
                fixed = startup.wall(variant).median
                stream = max(wall - fixed, 1e-9)
                text += (f" Taking off the fixed start-up cost ({ms(fixed)}, from the small "
                         f"layer), the stream itself runs at {gbps(size, stream):.2f} GB/s.")
            gib = r.throughput.get(1024 * MIB)
            if gib is not None and gib.ok and variant in gib.variants:
                text += (f" At 1 GiB, where the start-up weighs a quarter as much: "
                         f"{_ratio_text(speed_ratio(gib, variant, REF).median)}x.")
            floor = (2 / HASH_RATE + 1 / AES_RATE) * 1e9  # CPU-s per GB
            paired_floor = (2 / (HASH_RATE * PAIR_SPEEDUP) + 1 / AES_RATE) * 1e9
            text += (f" Where the time goes: ours hashes every byte twice (HMAC-SHA256 of the "
                     f"ciphertext, and SHA-256 of the plaintext for the digest check that refdec "
                     f"does not make) and decrypts it once: ~{floor:.2f} CPU-s per GB at the "
                     f"single-core rates in the field notes before any copying, one hash after "
                     f"the other, against refdec's HMAC alone. Hashing twice is the price of "
                     f"refusing a layer whose content is not the one its producer recorded. "
                     f"Where the SHA-256 pair is in use (see Versions), one thread computes both "
                     f"hashes at once, interleaved, in about {1 / PAIR_SPEEDUP:.0%} of the time "
                     f"one after the other takes (~{paired_floor:.2f} CPU-s per GB in all), "
                     f"while the other reads, decrypts and writes; without it one thread MACs "
                     f"and decrypts and the other digests and writes. Ours shares the two cores "
                     f"with the suite's reader (a byte-for-byte comparison with the plain "
                     f"blob); refdec runs on one core.")
            parts.append(text)
    for v in found:
        if v.target.startswith("~30 KB") and v.passed is False and startup is not None:
            variant = PIP if PIP in v.target else BUNDLE
            text = (f"**Start-up ({variant})**: {ms(startup.wall(variant).median)} for a ~30 KB "
                    f"layer, over the {v.goal.split('<= ')[1]} target; refdec takes "
                    f"{ms(startup.wall(REF).median)}.")
            if r.floor is not None and r.floor.ok:
                text += (f" The bare interpreter (`python -c pass`) already takes "
                         f"{ms(r.floor.wall('python -c pass').median)}.")
            if r.imports is not None and not r.imports.error and variant == PIP:
                heavy = ", ".join(f"`{m}` {t:.0f} ms" for m, t in r.imports.by_package[:4])
                text += (f" Imports account for {r.imports.total_ms:.0f} ms under "
                         f"`-X importtime` (which inflates them somewhat); by package: {heavy}.")
            parts.append(text)
    for v in found:
        if v.target.startswith("peak RSS") and v.passed is False:
            parts.append(f"**Memory ({v.target.split(', ')[1]})**: {v.measured}, against "
                         f"{v.goal}.")
        if v.target.startswith("encoder") and v.passed is False:
            parts.append(f"**{v.target[0].upper() + v.target[1:]}**: {v.measured}, below the "
                         f"{ENCODER_TARGET}x target.")
    for c in r.cri or []:
        if not c.ok or _cri_node(c) == REF:
            continue
        ratio = c.ratio("encrypted", "plain").median
        if ratio <= CRI_TARGET:
            continue  # met: listed under **Met**
        extra = c.wall("encrypted").median - c.wall("plain").median
        text = (f"**{c.name}**: the encrypted pull takes {ratio:.2f}x the plain one "
                f"({extra:+.2f} s per pull; " + (
                    "a stress case, no target)." if _is_stress(c) else
                    f"target {CRI_TARGET}x)."))
        variant = BUNDLE if "bundle" in c.name else PIP
        if startup is not None and variant in startup.variants:
            text += (f" Each pull starts the decoder twice (two layers): about "
                     f"{ms(2 * startup.wall(variant).median)} of start-up alone.")
        near = min(r.throughput, key=lambda s: abs(s - r.cri_size), default=None)
        if ("random" in c.name and near is not None and r.throughput[near].ok
                and variant in r.throughput[near].variants):
            t = r.throughput[near]
            text += (f" The decoder alone needs {secs(t.wall(variant).median)} for a "
                     f"{size_label(near)} layer (refdec {secs(t.wall(REF).median)}); in the pull "
                     f"it runs between the content store and containerd's gzip and tar "
                     f"extraction, competing with them for the two cores.")
        go = _go_twin(r, c)
        if go is not None:
            text += (f" The Go reference decoder in the same pull: "
                     f"{go.ratio('encrypted', 'plain').median:.2f}x.")
        if startup is not None and variant in startup.variants:
            text += (" Our start-up is the larger part of the difference, and an image pays it "
                     "once per encrypted layer: an image of many small layers feels it most.")
        parts.append(text)
    ahead = [v for v in found if v.passed]
    if ahead:
        parts.append("**Met**: " + "; ".join(f"{v.target} ({v.measured})" for v in ahead) + ".")
    missing = [v for v in found if v.passed is None]
    if missing:
        parts.append("**Not measured**: " + "; ".join(f"{v.target} ({v.measured})"
                                                      for v in missing) + ".")
    return "\n\n".join(parts) + "\n"


# --- whole report --------------------------------------------------------------------------


def stress_section(r: Results) -> str:
    rows = stress_rows(r)
    if not rows:
        return ""
    return (f"\nStress case, no target: CRI pull of the image whose second layer is "
            f"{size_label(r.cri_size)} of random data, which gzip cannot shrink, so the "
            "decoder's per-byte work weighs most next to containerd's. The issue's 1.15x is "
            "for an image; here even the Go decoder needs more (same pulls as section 5, "
            "encrypted against plain):\n\n"
            + table(["node", "time vs plain", "encrypted vs plain (medians)"], rows) + "\n")


def render(r: Results) -> str:
    found = verdicts(r)
    summary = table(["target", "goal", "measured (medians; ratios are per-round medians)",
                     "result"], [[v.target, v.goal, v.measured, v.result] for v in found])
    machine_rows = [[k, v] for k, v in r.machine.items()]
    version_rows = [[k, f"`{v}`"] for k, v in r.versions.items()]
    failures = ""
    if r.failures:
        failures = "\n**Failures in this run**:\n\n" + "\n".join(f"- {f}" for f in r.failures)
        failures += "\n"
    return f"""# Performance

Generated by `make bench` (`{r.command}`, sources in `bench/`) on {r.started}, {r.mode} mode,
in {r.seconds / 60:.1f} minutes; do not edit by hand. Every comparison alternates its variants in
the same run, rotating their order each round, after uncounted warm-up rounds ({r.rounds}), and
every counted run is checked (exit status 0 and the exact expected output), so a fast but wrong
program cannot score. The machine is shared and noisy: read the ratios, which compare runs made
side by side, rather than the absolute times.
{failures}
## Summary

{summary}
{stress_section(r)}
## Where we are behind, and why

{analysis(r, found)}
## Machine

{table(["", ""], machine_rows)}

## Versions

{table(["component", "version"], version_rows)}

## 1. Decoder throughput

{throughput_section(r)}
## 2. Small layer: start-up

{startup_section(r)}
## 3. Peak RSS against layer size

{rss_section(r)}
## 4. Encoder against skopeo

{encoder_section(r)}
## 5. End to end: CRI pull, encrypted against plain

{cri_section(r)}
## Noise

{noise_section(r)}"""


def plot(r: Results, path: Path) -> bool:
    """Throughput against layer size, one line per decoder (median, min-max bars)."""
    sizes = sorted(size for size, c in r.throughput.items() if c.ok)
    if not sizes:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    styles = {PIP: ("tab:blue", "o"), BUNDLE: ("tab:green", "s"), REF: ("tab:red", "^")}
    for variant, (color, marker) in styles.items():
        xs, ys, lo, hi = [], [], [], []
        for size in sizes:
            c = r.throughput[size]
            if variant not in c.variants:
                continue
            wall = c.wall(variant)
            rate = gbps(size_of(c), wall.median)
            xs.append(size / MIB)
            ys.append(rate)
            lo.append(rate - gbps(size_of(c), wall.maximum))
            hi.append(gbps(size_of(c), wall.minimum) - rate)
        if xs:
            label = "refdec (Go ocicrypt)" if variant == REF else f"ctd-decoder, {variant[6:-1]}"
            ax.errorbar(xs, ys, yerr=[lo, hi], color=color, marker=marker, capsize=3,
                        label=label)
    big = r.throughput.get(THROUGHPUT_SIZE)
    if big is not None and big.ok and REF in big.variants:
        goal = THROUGHPUT_TARGET * gbps(size_of(big), big.wall(REF).median)
        ax.plot([THROUGHPUT_SIZE / MIB], [goal], marker="*", markersize=14, color="black",
                linestyle="none", label=f"target: {THROUGHPUT_TARGET}x refdec at 256 MiB")
    ax.set_xscale("log", base=2)
    ax.set_xticks([s / MIB for s in sizes], [size_label(s) for s in sizes])
    ax.set_xlabel("layer size")
    ax.set_ylabel("GB/s, whole process (median, min-max)")
    ax.set_title(f"Decoder throughput ({r.machine.get('cores', '?').split()[0]} cores, "
                 f"{r.started[:10]})")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return True
