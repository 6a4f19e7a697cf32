"""Timing, pairing and machine facts shared by the kernel and model benchmarks.

Machines running these benchmarks are noisy (shared cores, frequency changes), so nothing here compares
numbers taken at different times. The contenders of one case are run round-robin, each round starting
with a different one, and every ratio is taken pair by pair from samples of the same round.
"""
import contextlib
import datetime
import functools
import gc
import importlib
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from importlib import metadata


class Unavailable(Exception):
    """A contender (or a whole case) cannot run here; the message says why, for the report's notes."""


# Names the kernels whose foldnorm call the benchmarks make twice: a slowdown injected on purpose, to show
# that the A/B comparison catches a kernel doing its work twice. Read here only, never by the library.
TWICE_ENV = "FOLDNORM_BENCH_TWICE"


def kernels_done_twice(environ=None):
    """The kernel names listed in FOLDNORM_BENCH_TWICE (comma-separated; `all` for every kernel)."""
    text = (os.environ if environ is None else environ).get(TWICE_ENV, "")
    return {name.strip() for name in text.split(",") if name.strip()}


def foldnorm_function(name):
    """foldnorm's public function `name`, called twice per call when FOLDNORM_BENCH_TWICE lists it."""
    import foldnorm

    try:
        function = getattr(foldnorm, name)
    except AttributeError:
        raise Unavailable("foldnorm.%s is not available in this build" % name) from None
    twice = kernels_done_twice()
    if name not in twice and "all" not in twice:
        return function

    @functools.wraps(function)
    def done_twice(*args, **kwargs):
        function(*args, **kwargs)
        return function(*args, **kwargs)

    return done_twice


# foldnorm's multi-threaded memcpy, the bandwidth roof, is internal: its module is looked up here alone,
# in the package layouts foldnorm has had, so that a move of the module is one line to change.
_COPY_MODULES = ("foldnorm.kernels._runtime", "foldnorm._runtime")


@functools.lru_cache(maxsize=None)
def _copy_function():
    for module in _COPY_MODULES:
        try:
            return importlib.import_module(module).parallel_copy
        except (ImportError, AttributeError):
            continue
    raise Unavailable("foldnorm's parallel_copy is in none of %s" % ", ".join(_COPY_MODULES))


def parallel_copy(dst, src, threads):
    """Copy src into dst (same size, contiguous) with foldnorm's OpenMP memcpy on `threads` threads."""
    return _copy_function()(dst, src, threads)


def first_line(error, limit=160):
    """`Type: message` cut to its first line and `limit` characters, for a one-line note."""
    text = "%s: %s" % (type(error).__name__, (str(error).splitlines() or [""])[0])
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Contender:
    """One thing timed in a case: `run` is timed, `prepare` (untimed) runs just before it.

    A `sparse` contender (the slow float64 NumPy reference) is timed only in the first rounds.
    """

    name: str
    threads: int
    run: object
    prepare: object = None
    sparse: bool = False

    @property
    def key(self):
        return "%s@%d" % (self.name, self.threads)


@dataclass
class Samples:
    """Seconds per round of one contender; rounds it skipped are absent."""

    by_round: dict = field(default_factory=dict)

    def summary(self):
        values = list(self.by_round.values())
        return {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "n": len(values),
        }


def measure(contenders, repeats, warmup=1, sparse_repeats=1, settle=0.0):
    """Time every contender `repeats` times (sparse ones `sparse_repeats` times), interleaved.

    Each contender is first called `warmup` times (sparse ones not at all: they are slow and allocate
    everything anew on each call anyway). After every call the harness sleeps `settle` seconds, so that
    worker threads still spinning after one contender do not take the cores from the next.
    Returns {contender.key: Samples}.
    """
    for _ in range(warmup):
        for contender in contenders:
            if not contender.sparse:
                _call(contender)
                time.sleep(settle)
    samples = {c.key: Samples() for c in contenders}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_index in range(repeats):
            shift = round_index % len(contenders)
            for contender in contenders[shift:] + contenders[:shift]:
                if contender.sparse and round_index >= sparse_repeats:
                    continue
                samples[contender.key].by_round[round_index] = _call(contender)
                time.sleep(settle)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def _call(contender):
    if contender.prepare is not None:
        contender.prepare()
    start = time.perf_counter()
    contender.run()
    return time.perf_counter() - start


@contextlib.contextmanager
def thread_settings_kept():
    """Restore foldnorm's and torch's default thread counts on exit.

    torch.set_num_threads, which the torch contenders call, also sets the OpenMP runtime that foldnorm
    shares with torch; without this a benchmark would leave the caller's kernels on another count.
    """
    import sys

    from foldnorm import get_num_threads, set_num_threads

    foldnorm_threads = get_num_threads()
    torch = sys.modules.get("torch")
    torch_threads = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(torch_threads or foldnorm_threads)
        set_num_threads(foldnorm_threads)


def paired_ratio(numerator, denominator):
    """Median (min, max) over the rounds both ran of numerator_seconds / denominator_seconds."""
    rounds = sorted(set(numerator.by_round) & set(denominator.by_round))
    if not rounds:
        return None
    ratios = [numerator.by_round[r] / denominator.by_round[r] for r in rounds]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "n": len(ratios)}


def paired_efficiency(kernel_few, kernel_many, copy_few, copy_many):
    """The kernel's speed-up from more threads over the copy's, per round: 1.0 scales as the memory allows.

    Each round's (kernel_few / kernel_many) / (copy_few / copy_many); median (min, max) over the rounds
    all four ran. A bandwidth-bound kernel cannot beat the copy's own scaling, so this is its parallel
    efficiency against a roof that the machine's memory, not the ideal line, sets.
    """
    rounds = sorted(set(kernel_few.by_round) & set(kernel_many.by_round) & set(copy_few.by_round)
                    & set(copy_many.by_round))
    if not rounds:
        return None
    values = [(kernel_few.by_round[r] / kernel_many.by_round[r]) / (copy_few.by_round[r] / copy_many.by_round[r])
              for r in rounds]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def thread_sweep(cores):
    """Thread counts from 1 to `cores`: every count up to 8, then powers of two, and `cores` itself."""
    counts = {t for t in range(1, min(cores, 8) + 1)}
    power = 16
    while power < cores:
        counts.add(power)
        power *= 2
    counts.add(cores)
    return sorted(counts)


def default_threads():
    """The sweep from 1 thread to foldnorm's own default thread count (all usable cores)."""
    from foldnorm import get_num_threads

    return thread_sweep(get_num_threads())


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def package_versions():
    versions = {"python": platform.python_version()}
    for name in ("foldnorm", "numpy", "onnx", "onnxruntime", "torch", "matplotlib"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def copy_bandwidth(threads, settle, megabytes=64, repeats=7):
    """GB/s (bytes read + bytes written) of foldnorm's multi-threaded memcpy, per thread count."""
    import numpy as np

    src = np.ones(megabytes * (1 << 20) // 4, dtype=np.float32)
    dst = np.empty_like(src)
    contenders = [Contender("copy", t, lambda t=t: parallel_copy(dst, src, t)) for t in threads]
    samples = measure(contenders, repeats, settle=settle)
    return {
        str(c.threads): 2 * src.nbytes / samples[c.key].summary()["median"] / 1e9 for c in contenders
    }


def openmp_spin_seconds(threads, limit=0.05, tries=5):
    """How long foldnorm's idle workers keep spinning after a parallel call at `threads` threads.

    The copy runs on foldnorm's thread team (libgomp's teams, which torch uses, spin GOMP_SPINCOUNT
    iterations, about 15 ms here, and are not measured). foldnorm's workers spin up to 20 ms while the
    machine has a core for every runnable thread, and give their core up within microseconds once another
    thread waits for it, so a contender timed next is not slowed by them. Measured as the time until the
    process stops burning CPU while its main thread sleeps (the name is kept for the JSON's readers).
    """
    import numpy as np

    if threads < 2:
        return 0.0
    src = np.ones(1 << 21, dtype=np.float32)
    dst = np.empty_like(src)
    spins = []
    for _ in range(tries):
        parallel_copy(dst, src, threads)
        start = time.perf_counter()
        while time.perf_counter() - start < limit:
            cpu = time.process_time()
            time.sleep(0.001)
            if time.process_time() - cpu < 0.0003:
                break
        spins.append(time.perf_counter() - start)
    return max(spins)


def settle_seconds(threads):
    """The pause after each timed call: twice the idle workers' longest spin, 5 to 50 ms."""
    return min(0.05, max(0.005, 2 * openmp_spin_seconds(max(threads))))


def machine_info(threads, settle):
    import foldnorm

    from .machine import binding, caches, topology

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "topology": topology(),
        "caches": caches(),
        "binding": binding(),
        "threads": list(threads),
        "load_average": list(load) if load else None,
        "settle_seconds": settle,
        "copy_gbps": copy_bandwidth(threads, settle),
        "versions": package_versions(),
        "foldnorm_build": foldnorm.build_info(),
    }
