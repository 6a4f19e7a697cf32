"""What the machine is, and whether it is quiet enough for its clock to be believed.

Topology (sockets, NUMA nodes, cores, SMT) is read from /sys. A machine is called busy when, at the start,
its 1-minute load average is well above its cores, other processes use a good share of its CPUs, the
hypervisor steals time, or the same spin loop run on every core at once is much slower than run alone
(cores shared with someone else); and, over a whole run, when other processes or steal took a good share
of the CPU time. Every reader takes its input as text or numbers, so the rules are tested on synthetic
/proc values.
"""
import os
import re
import resource
import time
from dataclasses import dataclass, field

LOAD_PER_CORE = 1.5  # 1-minute load average above this many runnable tasks per core
OTHERS_SHARE = 0.30  # other processes' share of all CPU time
STEAL_SHARE = 0.05  # the hypervisor's share of all CPU time
SPIN_SLOWDOWN = 1.30  # a spin loop on every core at once, against alone


@dataclass
class CpuTimes:
    """Whole-machine CPU time from /proc/stat's `cpu` line, in seconds."""

    busy: float
    idle: float
    steal: float

    @property
    def total(self):
        return self.busy + self.idle + self.steal


def parse_proc_stat(text, ticks_per_second=100):
    """CpuTimes from the text of /proc/stat (user nice system idle iowait irq softirq steal ...)."""
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            values = [int(v) for v in parts[1:]] + [0] * 8
            user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
            return CpuTimes(busy=(user + nice + system + irq + softirq) / ticks_per_second,
                            idle=(idle + iowait) / ticks_per_second, steal=steal / ticks_per_second)
    raise ValueError("no aggregate 'cpu' line in /proc/stat")


def read_cpu_times():
    try:
        with open("/proc/stat") as f:
            return parse_proc_stat(f.read(), os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError):
        return None


def own_cpu_seconds():
    """CPU seconds of this process and of its children that have been waited for."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def shares(before, after, own_seconds):
    """(others' share, steal share) of all CPU time between two CpuTimes; own_seconds: ours in between."""
    total = after.total - before.total
    if total <= 0:
        return 0.0, 0.0
    others = max(0.0, after.busy - before.busy - own_seconds)
    return others / total, (after.steal - before.steal) / total


def _spin(iterations):
    start = time.perf_counter()
    total = 0
    for i in range(iterations):
        total += i
    return time.perf_counter() - start


def _spin_best(iterations, tries, connection=None):
    best = min(_spin(iterations) for _ in range(tries))
    if connection is not None:
        connection.send(best)
        connection.close()
    return best


def spin_slowdown(workers, iterations=200_000, tries=5):
    """Median best time of a spin loop run by `workers` processes at once, over its best time alone."""
    import multiprocessing

    alone = _spin_best(iterations, tries)
    if workers < 2:
        return 1.0
    context = multiprocessing.get_context("fork")
    pipes = [context.Pipe(duplex=False) for _ in range(workers)]
    processes = [context.Process(target=_spin_best, args=(iterations, tries, send)) for _, send in pipes]
    for process in processes:
        process.start()
    together = sorted(receive.recv() for receive, _ in pipes)
    for process in processes:
        process.join()
    return together[len(together) // 2] / alone


@dataclass
class Check:
    """Whether the machine is busy, why, and the numbers the verdict came from."""

    busy: bool = False
    reasons: list = field(default_factory=list)
    numbers: dict = field(default_factory=dict)

    def add(self, name, value, limit, reason, percent=False):
        """Record `value`; above `limit` the machine is busy, and `reason` (with {value} and {limit}) says why."""
        self.numbers[name] = value
        if value is not None and value > limit:
            self.busy = True
            shown = (lambda v: "%.0f%%" % (100 * v)) if percent else (lambda v: "%.2f" % v)
            self.reasons.append(reason.format(value=shown(value), limit=shown(limit)))

    def as_dict(self):
        return {"busy": self.busy, "reasons": list(self.reasons), "numbers": dict(self.numbers)}


def judge_start(cores, load1, others_share, steal_share, slowdown):
    """The start-of-run verdict from its measurements (any of them None when not measurable here)."""
    check = Check()
    check.numbers["cores"] = cores
    check.add("load1_per_core", None if load1 is None else load1 / cores, LOAD_PER_CORE,
              "1-minute load average of {value} per core (limit {limit})")
    check.add("others_share", others_share, OTHERS_SHARE,
              "other processes used {value} of the CPUs while this run waited (limit {limit})", percent=True)
    check.add("steal_share", steal_share, STEAL_SHARE,
              "the hypervisor stole {value} of the CPU time (limit {limit})", percent=True)
    check.add("spin_slowdown", slowdown, SPIN_SLOWDOWN,
              "a spin loop on every core at once ran {value}x slower than alone (limit {limit}x)")
    return check


def judge_run(others_share, steal_share):
    """The whole-run verdict: other processes' and the hypervisor's shares of CPU time during the run."""
    check = Check()
    check.add("others_share", others_share, OTHERS_SHARE,
              "other processes used {value} of the CPUs during the run (limit {limit})", percent=True)
    check.add("steal_share", steal_share, STEAL_SHARE,
              "the hypervisor stole {value} of the CPU time during the run (limit {limit})", percent=True)
    return check


def merge(*checks):
    """One verdict from several: busy if any was, every reason, the numbers under each check's name."""
    merged = Check()
    for name, check in checks:
        merged.busy = merged.busy or check.busy
        merged.reasons += check.reasons
        merged.numbers[name] = dict(check.numbers)
    return merged


def check_start(cores, sample_seconds=1.0):
    """Measure and judge the machine before a run: load, a quiet sample of /proc/stat, the spin check."""
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = None
    before, own_before = read_cpu_times(), own_cpu_seconds()
    time.sleep(sample_seconds)
    after, own_after = read_cpu_times(), own_cpu_seconds()
    others = steal = None
    if before and after:
        others, steal = shares(before, after, own_after - own_before)
    return judge_start(cores, load1, others, steal, spin_slowdown(cores))


class RunMonitor:
    """CPU time of the machine and of this process tree from start to `finish`, judged by `judge_run`."""

    def __init__(self):
        self.before = read_cpu_times()
        self.own_before = own_cpu_seconds()

    def finish(self):
        after = read_cpu_times()
        if self.before is None or after is None:
            return judge_run(None, None)
        return judge_run(*shares(self.before, after, own_cpu_seconds() - self.own_before))


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def parse_cpu_list(text):
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        cpus.extend(range(int(low), int(high or low) + 1))
    return cpus


def _usable_cpus():
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count()))


def topology(root="/sys/devices/system", usable=None):
    """Sockets, NUMA nodes, physical cores and SMT threads per core of the CPUs this process may use."""
    usable = _usable_cpus() if usable is None else usable
    cores, sockets = set(), set()
    for cpu in usable:
        base = os.path.join(root, "cpu", "cpu%d" % cpu, "topology")
        package = _read(os.path.join(base, "physical_package_id"))
        core = _read(os.path.join(base, "core_id"))
        if package is None or core is None:
            return {"logical_cpus": len(usable), "known": False}
        sockets.add(package)
        cores.add((package, core))
    nodes = []
    node_root = os.path.join(root, "node")
    if os.path.isdir(node_root):
        for name in sorted(os.listdir(node_root)):
            if name.startswith("node") and name[4:].isdigit():
                cpus = set(parse_cpu_list(_read(os.path.join(node_root, name, "cpulist"))))
                if cpus & set(usable):
                    nodes.append(name)
    return {
        "known": True,
        "logical_cpus": len(usable),
        "physical_cores": len(cores),
        "sockets": len(sockets),
        "numa_nodes": max(1, len(nodes)),
        "smt_per_core": len(usable) // max(1, len(cores)),
    }


def binding():
    """The OpenMP thread-binding settings in effect (see the benchmarks README on binding)."""
    return {name: os.environ.get(name) for name in ("OMP_PROC_BIND", "OMP_PLACES", "OMP_NUM_THREADS",
                                                    "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}


def banner(check):
    """The loud lines that open a report from a busy machine (empty when it was quiet)."""
    if not check["busy"]:
        return []
    lines = ["**BUSY MACHINE: the timings of this run are unreliable.**", ""]
    lines += ["- %s" % reason for reason in check["reasons"]]
    return lines + [""]


_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMG]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text):
    """Bytes of a cache size as sysfs ('48K') or lscpu ('480 MiB', '32768 KB') writes it."""
    match = _SIZE.match(text or "")
    if not match:
        raise ValueError("not a cache size: %r" % text)
    return int(float(match.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2).upper()])


def _cache_name(level, kind):
    return "L%s%s" % (level, {"Data": "d", "Instruction": "i"}.get(kind, ""))


def caches(root="/sys/devices/system/cpu", usable=None):
    """The data and unified caches the usable CPUs have: one dict per level, smallest first.

    Each: `name` (L1d, L2, L3 ...), `level`, `bytes_per_instance`, `instances` (how many distinct caches of
    that level the usable CPUs share out), `bytes_total`. Read from sysfs; lscpu's summary where sysfs has
    no cache folders (an lscpu that does not count instances gives one of each); [] when neither says.
    """
    found = {}
    for cpu in _usable_cpus() if usable is None else usable:
        folder = os.path.join(root, "cpu%d" % cpu, "cache")
        names = sorted(n for n in os.listdir(folder) if n.startswith("index")) if os.path.isdir(folder) else []
        for name in names:
            base = os.path.join(folder, name)
            level, kind, size = (_read(os.path.join(base, f)) for f in ("level", "type", "size"))
            if level is None or size is None or kind == "Instruction":
                continue
            entry = found.setdefault(_cache_name(level, kind), {"level": int(level), "sizes": set(), "shared": set()})
            entry["sizes"].add(parse_size(size))
            entry["shared"].add(_read(os.path.join(base, "shared_cpu_list")) or "cpu%d" % cpu)
    if not found:
        return lscpu_caches()
    return sorted(({"name": name, "level": e["level"], "bytes_per_instance": max(e["sizes"]),
                    "instances": len(e["shared"]), "bytes_total": max(e["sizes"]) * len(e["shared"])}
                   for name, e in found.items()), key=lambda c: (c["level"], c["name"]))


def parse_lscpu_caches(text):
    """The caches of lscpu's summary ('L2 cache:  4 MiB (2 instances)'), as `caches` gives them."""
    found = []
    for line in text.splitlines():
        label, _, value = line.partition(":")
        label = label.strip()
        if not (label.startswith("L") and label.endswith(" cache")) or label.startswith("L1i"):
            continue
        size, _, rest = value.strip().partition("(")
        instances = int(rest.split()[0]) if rest[:1].isdigit() else 1
        total = parse_size(size)
        name = label.split()[0]
        found.append({"name": name, "level": int(name[1]), "bytes_per_instance": total // instances,
                      "instances": instances, "bytes_total": total})
    return sorted(found, key=lambda c: (c["level"], c["name"]))


def lscpu_caches():
    import subprocess

    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, env=dict(os.environ, LC_ALL="C")).stdout
        return parse_lscpu_caches(text)
    except (OSError, ValueError):
        return []


def last_level_cache(found):
    """The last-level cache of `caches()`'s list, or None when none is known."""
    return max(found, key=lambda c: c["level"]) if found else None


def caches_text(found):
    """`L1d 48 KiB x 2, L2 2 MiB x 2, L3 480 MiB x 1` from `caches()`'s list."""
    return ", ".join("%s %s x %d" % (c["name"], size_text(c["bytes_per_instance"]), c["instances"])
                     for c in found) or "unknown"


def size_text(nbytes):
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return "%.3g %s" % (nbytes / scale, unit)
    return "%d B" % nbytes


def available_memory(path="/proc/meminfo"):
    """Bytes of memory the system could give without swapping (MemAvailable), or None where unknown."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
