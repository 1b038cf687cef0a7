"""Taking measurements: one program run, alternated variants, and their statistics.

`spawn` starts a program with posix_spawn (no shell, no wrapper process in the measurement),
stdin from a file, an optional stream-processor payload on fd 3 through a pipe (as containerd
hands it), stdout either into a pipe that a reader thread drains, or into a file. The reader is
the same for every program: it reads the pipe into one reused 1 MiB buffer and checks it as it
goes, either against the file of the expected output (libc's memcmp against a mapping of the
file made once for the whole suite, ~0.03 CPU-s per GB on top of reading the pipe) or, where no
such file exists, with SHA-256 (~0.6 CPU-s per GB). Decoder runs use the comparison. The
reader shares the machine's two cores with the program, so what it spends is taken from a
program that spreads over both cores and not from one that runs on one: hashing in the reader
took half a core, and reading the expected file into a second buffer per run (the comparison
before this one) cost ours 31 ms of a 333 ms run at 256 MiB against refdec's 5 ms (15
alternated rounds). Neither says anything about the program (containerd's own reader
does gunzip, the diffID hash and tar extraction, which the CRI benchmark measures). Spilling
into a tmpfs file and checking afterwards was tried and made the runs noisier: on these virtual
machines touching hundreds of MiB of fresh pages per run is slow and uneven. Wall time runs
from just before the spawn to the later of the process's exit and the reader's end of file.

CPU time and peak RSS: the program is started through GNU time (`/usr/bin/time`, Debian's
`time` package), which forks and execs it and reports the `wait4` rusage of that child.
This is needed for the peak RSS: Linux records the resident set of the memory image a process
replaces in exec as part of its `ru_maxrss`, so a program spawned directly from this (large)
Python process would report at least our own RSS; forked from GNU time it reports at most
time's ~2 MiB. CPU time is the `wait4` rusage of the time process (its child included), so it
has microsecond resolution. The launcher adds about a millisecond of fork and exec to every
program's wall time alike.

`alternate` runs the variants of one comparison in rounds, rotating their order every round,
after warm-up rounds that are not counted. Each variant is a callable that performs one run,
checks its output and returns a `Sample`; a check that fails raises `WrongOutput`.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import mmap
import os
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, cast

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
GNU_TIME = Path("/usr/bin/time")
READ_CHUNK = 1 << 20
PIPE_PAYLOAD_LIMIT = 60 * 1024


class BenchError(Exception):
    """The benchmark environment is broken (a tool is missing, a step failed)."""


class WrongOutput(Exception):
    """A measured run exited non-zero or produced output other than the expected one."""


@dataclass(frozen=True)
class Sample:
    """One measured run: seconds of wall time, seconds of CPU, peak RSS in bytes."""

    wall: float
    cpu: float | None = None
    maxrss: int | None = None


@dataclass(frozen=True)
class ProcessRun:
    """What `spawn` saw of one process."""

    argv: tuple[str, ...]
    wall: float
    user: float
    system: float
    maxrss: int
    returncode: int
    stdout_sha256: str | None
    stdout_size: int
    stdout_differs_at: int | None  # with a reference file: first differing offset, else None
    stderr: str

    @property
    def cpu(self) -> float:
        return self.user + self.system

    def sample(self) -> Sample:
        return Sample(self.wall, self.cpu, self.maxrss)

    def describe_failure(self) -> str:
        status = (f"killed by signal {-self.returncode}" if self.returncode < 0
                  else f"exit status {self.returncode}")
        tail = self.stderr.strip().splitlines()[-3:]
        return f"{os.path.basename(self.argv[0])}: {status}; stderr: {' | '.join(tail) or '-'}"


def program_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every measured program: small and the same for all of them.

    Like containerd's, it has no PYTHON* variables (PYTHONDONTWRITEBYTECODE in a developer's
    shell would make every Python start compile its modules) and no proxy settings.
    """
    env = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "HOME": "/root"}
    env.update(extra or {})
    return env


def _high_fd(fd: int) -> int:
    """Move fd above 9, so the dup2s onto 0-3 in the child can never overwrite one another."""
    if fd >= 10:
        return fd
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


def scratch_dir() -> Path:
    """Where scratch files go (stderr, GNU time's report, encoder output): tmpfs if there is
    one, so no disk write-back lands in a later measurement."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


def spawn(
    argv: Sequence[str | Path],
    *,
    stdin: Path | None = None,
    payload: bytes | None = None,
    stdout: Path | None = None,
    hash_stdout: bool = True,
    reference: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
) -> ProcessRun:
    """Run one program and measure it (see the module docstring).

    stdin: a file for fd 0 (else /dev/null). payload: bytes for fd 3, through a pipe whose
    write end is closed before the program starts (else no fd 3). stdout: a file to write fd 1
    to; when None, fd 1 is a pipe drained by the reader, which compares it with the file
    `reference` when given, else hashes it when hash_stdout.
    The program is killed after `timeout` seconds.
    """
    program = [str(a) for a in argv]
    if not GNU_TIME.is_file():
        raise BenchError(f"{GNU_TIME} is missing: install Debian's time package")
    stat_fd, stat_name = tempfile.mkstemp(prefix="pyimgcrypt-bench-time-", dir=scratch_dir())
    os.close(stat_fd)
    stat_path = Path(stat_name)
    args = [str(GNU_TIME), "-o", stat_name, "-f", "%M %x", *program]
    opened: list[int] = []
    reader: _Reader | None = None
    pid = 0
    err_file = tempfile.TemporaryFile(dir=scratch_dir())
    try:
        stdin_fd = _high_fd(os.open(stdin or os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        opened.append(stdin_fd)
        err_fd = _high_fd(os.dup(err_file.fileno()))
        opened.append(err_fd)
        payload_fd: int | None = None
        if payload is not None:
            if len(payload) > PIPE_PAYLOAD_LIMIT:
                raise BenchError("payload larger than a pipe buffer")
            read_end, write_end = os.pipe()
            os.write(write_end, payload)
            os.close(write_end)
            payload_fd = _high_fd(read_end)
            opened.append(payload_fd)
        if stdout is not None:
            out_fd = _high_fd(os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                                      0o600))
            opened.append(out_fd)
        else:
            pipe_read, pipe_write = os.pipe()
            pipe_read = _high_fd(pipe_read)
            out_fd = _high_fd(pipe_write)
            opened.append(out_fd)
            reader = _Reader(pipe_read, hash_stdout, reference)
            reader.start()  # from here on, closing out_fd (always done) ends it
        actions: list[tuple[int, int, int]] = [
            (os.POSIX_SPAWN_DUP2, stdin_fd, 0),
            (os.POSIX_SPAWN_DUP2, out_fd, 1),
            (os.POSIX_SPAWN_DUP2, err_fd, 2),
        ]
        if payload_fd is not None:
            actions.append((os.POSIX_SPAWN_DUP2, payload_fd, 3))
        started = time.perf_counter()
        pid = os.posix_spawn(args[0], args, dict(env or program_env()), file_actions=actions,
                             setpgroup=0)  # its own process group: a timeout ends both
        for fd in opened:
            os.close(fd)
        opened.clear()
        killer = threading.Timer(timeout, _kill, (pid,))
        killer.daemon = True
        killer.start()
        try:
            _, status, usage = os.wait4(pid, 0)
        finally:
            killer.cancel()
        pid = 0
        exited = time.perf_counter()
        if reader is not None:
            reader.join(timeout)
            if reader.is_alive():
                raise BenchError(f"{program[0]}: its stdout stayed open {timeout:.0f} s past "
                                 "its exit")
            if reader.error is not None:
                raise BenchError(f"reading the output of {program[0]}: {reader.error}")
        ended = max(exited, reader.finished if reader is not None else 0.0)
        err_file.seek(0)
        stderr = err_file.read(65536).decode("utf-8", "replace")
        digest = reader.digest if reader is not None else None
        size = reader.size if reader is not None else 0
        differs_at = reader.differs_at if reader is not None else None
        maxrss, returncode = _time_report(stat_path, os.waitstatus_to_exitcode(status))
        return ProcessRun(
            argv=tuple(program), wall=ended - started, user=usage.ru_utime,
            system=usage.ru_stime, maxrss=maxrss, returncode=returncode,
            stdout_sha256=digest, stdout_size=size, stdout_differs_at=differs_at,
            stderr=stderr,
        )
    finally:
        err_file.close()
        if pid:
            _kill(pid)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        for fd in opened:
            os.close(fd)
        stat_path.unlink(missing_ok=True)


class _Mapped:
    """A reference file mapped once for the whole suite, compared against with libc's memcmp:
    no read of the file into a buffer per run, and after the first run no page faults."""

    _open: ClassVar[dict[tuple[str, int, int], _Mapped]] = {}

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.size = os.fstat(fd).st_size
            # Private and writable only so that ctypes can take its address; never written.
            self.map = mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE,
                                 prot=mmap.PROT_READ | mmap.PROT_WRITE) if self.size else None
        finally:
            os.close(fd)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.map)) if self.map else 0

    @classmethod
    def of(cls, path: Path) -> _Mapped:
        info = path.stat()
        key = (str(path), info.st_ino, info.st_mtime_ns)
        if key not in cls._open:
            cls._open[key] = cls(path)
        return cls._open[key]

    def first_difference(self, offset: int, data: bytearray, count: int) -> int | None:
        """Where data[:count] first differs from the file's bytes at offset, else None."""
        have = max(0, min(count, self.size - offset))  # the output may run past the file
        if self.map is None or have == 0:
            return 0
        if _memcmp(self.address + offset, ctypes.addressof(ctypes.c_char.from_buffer(data)),
                   have) == 0:
            return None if have == count else have
        expected = self.map[offset:offset + have]
        return next((i for i in range(have) if data[i] != expected[i]), have)


def _libc_memcmp() -> Callable[[int, int, int], int]:
    function = ctypes.CDLL(None).memcmp
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return cast(Callable[[int, int, int], int], function)


_memcmp = _libc_memcmp()


class _Reader(threading.Thread):
    """Drains a pipe to its end, checking what it reads (see the module docstring); closes
    the pipe when done."""

    def __init__(self, fd: int, hashing: bool, reference: Path | None = None):
        super().__init__(daemon=True)
        self.fd = fd
        self.hashing = hashing and reference is None
        self.reference = _Mapped.of(reference) if reference is not None else None
        self.size = 0
        self.digest: str | None = None
        self.differs_at: int | None = None
        self.finished = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        buffer = bytearray(READ_CHUNK)
        view = memoryview(buffer)
        hasher = hashlib.sha256()
        reference = self.reference
        try:
            while (count := self._fill(view)) > 0:
                if reference is not None and self.differs_at is None:
                    at = reference.first_difference(self.size, buffer, count)
                    if at is not None:
                        self.differs_at = self.size + at
                elif self.hashing:
                    hasher.update(view[:count])
                self.size += count
            if reference is not None and self.differs_at is None and (
                    reference.size != self.size):
                self.differs_at = self.size
            if self.hashing:
                self.digest = "sha256:" + hasher.hexdigest()
        except BaseException as e:  # reported by spawn after the join
            self.error = e
        finally:
            self.finished = time.perf_counter()
            os.close(self.fd)

    def _fill(self, view: memoryview) -> int:
        """Read until the buffer is full or the pipe ends, so whole buffers can be compared."""
        filled = 0
        while filled < len(view) and (count := os.readv(self.fd, [view[filled:]])) > 0:
            filled += count
        return filled


def _time_report(path: Path, launcher_status: int) -> tuple[int, int]:
    """(peak RSS in bytes, exit status) of the program, from GNU time's `%M %x` line."""
    lines = path.read_text(errors="replace").split("\n")
    fields = next((line.split() for line in reversed(lines) if line.strip()), [])
    try:
        return int(fields[0]) * 1024, int(fields[1])
    except (IndexError, ValueError):
        if launcher_status == 0:
            raise BenchError(f"GNU time wrote no usable report: {lines!r}") from None
        return 0, launcher_status


def _kill(pid: int) -> None:
    """Kill GNU time and the program (the process group spawn gave them)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def expect_output(run: ProcessRun, digest: str, size: int | None = None) -> Sample:
    """The run's sample, if it exited 0 and wrote exactly the expected bytes; else WrongOutput."""
    if run.returncode != 0:
        raise WrongOutput(run.describe_failure())
    if run.stdout_sha256 != digest or (size is not None and run.stdout_size != size):
        raise WrongOutput(
            f"{os.path.basename(run.argv[0])} wrote {run.stdout_size} bytes with "
            f"{run.stdout_sha256}, expected {size if size is not None else '?'} bytes with {digest}"
        )
    return run.sample()


def expect_same_output(run: ProcessRun, reference: Path) -> Sample:
    """The run's sample, if it exited 0 and wrote exactly the bytes of `reference` (the run
    must have been spawned with it); else WrongOutput."""
    if run.returncode != 0:
        raise WrongOutput(run.describe_failure())
    if run.stdout_differs_at is not None:
        raise WrongOutput(
            f"{os.path.basename(run.argv[0])} wrote {run.stdout_size} bytes that differ from "
            f"{reference} ({reference.stat().st_size} bytes) at offset {run.stdout_differs_at}"
        )
    return run.sample()


def expect_success(run: ProcessRun) -> Sample:
    if run.returncode != 0:
        raise WrongOutput(run.describe_failure())
    return run.sample()


# --- alternation and statistics ------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    median: float
    minimum: float
    maximum: float

    @staticmethod
    def of(values: Sequence[float]) -> Stats:
        return Stats(statistics.median(values), min(values), max(values))


@dataclass
class Comparison:
    """The samples of one comparison: per variant, one sample per counted round.

    `error` is set when a run failed its check (or a step failed); the comparison then stops
    and has no verdict.
    """

    name: str
    variants: list[str]
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    note: str = ""
    size: int = 0  # bytes of the layer (or image) measured, where that means something
    noise: Noise | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and all(self.samples.get(v) for v in self.variants)

    def wall(self, variant: str) -> Stats:
        return Stats.of([s.wall for s in self.samples[variant]])

    def cpu(self, variant: str) -> Stats | None:
        values = [s.cpu for s in self.samples[variant] if s.cpu is not None]
        return Stats.of(values) if values else None

    def maxrss(self, variant: str) -> Stats | None:
        values = [float(s.maxrss) for s in self.samples[variant] if s.maxrss is not None]
        return Stats.of(values) if values else None

    def ratios(self, numerator: str, denominator: str) -> list[float]:
        """Per round, wall(numerator) / wall(denominator)."""
        pairs = zip(self.samples[numerator], self.samples[denominator], strict=True)
        return [a.wall / b.wall for a, b in pairs]

    def ratio(self, numerator: str, denominator: str) -> Stats:
        return Stats.of(self.ratios(numerator, denominator))


def rotations(names: Sequence[str], rounds: int) -> Iterator[list[str]]:
    """The order of each round: the variants rotated by one every round."""
    for index in range(rounds):
        shift = index % len(names)
        yield [*names[shift:], *names[:shift]]


def alternate(
    name: str,
    variants: Mapping[str, Callable[[], Sample]],
    *,
    warmup: int,
    runs: int,
    progress: Callable[[str], None] | None = None,
) -> Comparison:
    """Run `warmup` uncounted and `runs` counted rounds of every variant, rotating the order.

    Starts once the machine is quiet (see `settle`). A WrongOutput or BenchError ends the
    comparison with `error` set.
    """
    names = list(variants)
    result = Comparison(name, names, {n: [] for n in names})
    settle(progress)
    began = time.monotonic()
    before = NoiseProbe()
    try:
        for index, order in enumerate(rotations(names, warmup + runs)):
            counted = index >= warmup
            for variant in order:
                sample = variants[variant]()
                if counted:
                    result.samples[variant].append(sample)
            if progress is not None:
                label = f"run {index - warmup + 1}/{runs}" if counted else "warm-up"
                shown = ", ".join(
                    f"{v} {result.samples[v][-1].wall:.3f}s" for v in names if counted
                )
                progress(f"  {name}: {label}{' ' + shown if shown else ''}")
    except (WrongOutput, BenchError) as e:
        result.error = f"{type(e).__name__}: {e}"
        if progress is not None:
            progress(f"  {name}: FAILED: {result.error}")
    result.seconds = time.monotonic() - began
    result.noise = before.since()
    return result


@dataclass(frozen=True)
class Noise:
    """What else ran during a comparison, in cores (averaged over its duration): `other` is
    the machine's busy CPU time (/proc/stat) minus this process's and its reaped children's
    (the measured programs, the reader thread), `steal` the hypervisor's steal time."""

    other: float
    steal: float


SETTLE = {"threshold": 0.3, "patience": 30.0}  # cores; seconds (`settle`); set by __main__


def settle(progress: Callable[[str], None] | None = None) -> float:
    """Wait (at most SETTLE["patience"] seconds) until the rest of the machine uses less than
    SETTLE["threshold"] cores over one second; return how long that took. On a shared machine
    this keeps other sessions' test runs out of a comparison where it can."""
    if SETTLE["patience"] <= 0:
        return 0.0
    began = time.monotonic()
    told = False
    while True:
        probe = NoiseProbe()
        time.sleep(1.0)
        noise = probe.since()
        waited = time.monotonic() - began
        if noise is None or noise.other + noise.steal < SETTLE["threshold"]:
            return waited
        if waited >= SETTLE["patience"]:
            if progress is not None:
                progress(f"  the machine stayed busy ({noise.other + noise.steal:.2f} cores "
                         "elsewhere); measuring anyway")
            return waited
        if not told and progress is not None:
            progress(f"  waiting for the machine to quiet down ({noise.other:.2f} cores busy "
                     "elsewhere)")
            told = True


class NoiseProbe:
    """Snapshot of the machine's and our own CPU counters; `since()` gives the Noise after."""

    def __init__(self) -> None:
        self.wall = time.monotonic()
        self.busy, self.steal = _machine_cpu()
        self.own = _own_cpu()

    def since(self) -> Noise | None:
        elapsed = time.monotonic() - self.wall
        if elapsed <= 0 or self.busy < 0:
            return None
        busy, steal = _machine_cpu()
        other = (busy - self.busy) - (_own_cpu() - self.own)
        return Noise(max(other, 0.0) / elapsed, max(steal - self.steal, 0.0) / elapsed)


def _machine_cpu() -> tuple[float, float]:
    """(busy seconds excluding steal, steal seconds) of all CPUs, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return -1.0, -1.0
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / tick, steal / tick


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system
