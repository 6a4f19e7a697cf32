"""Busy-machine detection and topology on synthetic /proc and /sys values."""
import pytest

from benchmarks import machine

STAT_BEFORE = """cpu  1000 0 500 8000 100 0 0 0 0 0
cpu0 500 0 250 4000 50 0 0 0 0 0
intr 12345
"""


def _stat(user, system, idle, steal):
    return "cpu  %d 0 %d %d 0 0 0 %d 0 0\nctxt 1\n" % (user, system, idle, steal)


def test_proc_stat_is_read_from_its_aggregate_cpu_line():
    times = machine.parse_proc_stat(STAT_BEFORE, ticks_per_second=100)
    assert (times.busy, times.idle, times.steal) == (15.0, 81.0, 0.0)
    with pytest.raises(ValueError, match="no aggregate 'cpu' line"):
        machine.parse_proc_stat("cpu0 1 2 3 4\n")
    short = machine.parse_proc_stat("cpu 10 0 10 80\n")  # old kernels: no steal column
    assert short.steal == 0 and short.total == pytest.approx(1.0)


def test_shares_split_busy_time_into_ours_others_and_steal():
    before = machine.parse_proc_stat(_stat(0, 0, 0, 0))
    # 2 cores for 1 s = 200 ticks: 60 busy (20 of them ours), 130 idle, 10 stolen.
    after = machine.parse_proc_stat(_stat(50, 10, 130, 10))
    others, steal = machine.shares(before, after, own_seconds=0.2)
    assert others == pytest.approx(0.2) and steal == pytest.approx(0.05)
    assert machine.shares(before, before, 0.0) == (0.0, 0.0)


def test_a_quiet_machine_is_not_busy():
    check = machine.judge_start(cores=2, load1=0.5, others_share=0.02, steal_share=0.0, slowdown=1.05)
    assert not check.busy and check.reasons == []
    assert check.numbers["load1_per_core"] == 0.25
    assert machine.banner(check.as_dict()) == []


@pytest.mark.parametrize("measured, words", [
    ({"load1": 5.4}, "1-minute load average of 2.70 per core (limit 1.50)"),
    ({"others_share": 0.55}, "other processes used 55% of the CPUs while this run waited (limit 30%)"),
    ({"steal_share": 0.12}, "the hypervisor stole 12% of the CPU time (limit 5%)"),
    ({"slowdown": 1.8}, "a spin loop on every core at once ran 1.80x slower than alone (limit 1.30x)"),
])
def test_each_sign_of_a_busy_machine_is_caught_and_said(measured, words):
    values = dict(load1=0.5, others_share=0.0, steal_share=0.0, slowdown=1.0)
    values.update(measured)
    check = machine.judge_start(cores=2, **values)
    assert check.busy and check.reasons == [words]
    banner = machine.banner(check.as_dict())
    assert banner[0].startswith("**BUSY MACHINE") and ("- " + words) in banner


def test_unmeasurable_values_do_not_make_a_machine_busy():
    assert not machine.judge_start(cores=4, load1=None, others_share=None, steal_share=None, slowdown=None).busy


def test_the_whole_run_is_judged_and_merged_with_the_start():
    during = machine.judge_run(others_share=0.45, steal_share=0.01)
    assert during.busy and "during the run" in during.reasons[0]
    start = machine.judge_start(cores=2, load1=0.1, others_share=0.0, steal_share=0.0, slowdown=1.0)
    merged = machine.merge(("start", start), ("run", during)).as_dict()
    assert merged["busy"] and merged["reasons"] == during.reasons
    assert merged["numbers"]["run"]["others_share"] == 0.45 and merged["numbers"]["start"]["cores"] == 2


def test_the_monitor_of_a_run_on_this_machine_gives_shares_between_0_and_1():
    monitor = machine.RunMonitor()
    sum(range(200_000))
    numbers = monitor.finish().numbers
    assert all(v is None or 0 <= v <= 1 for v in numbers.values())


def _cpu(root, cpu, package, core):
    topology = root / "cpu" / ("cpu%d" % cpu) / "topology"
    topology.mkdir(parents=True)
    (topology / "physical_package_id").write_text("%d\n" % package)
    (topology / "core_id").write_text("%d\n" % core)


def test_topology_counts_sockets_numa_nodes_cores_and_smt(tmp_path):
    # 2 sockets x 2 cores x 2 SMT threads; a NUMA node per socket.
    for cpu in range(8):
        _cpu(tmp_path, cpu, package=cpu // 4, core=(cpu // 2) % 2)
    for node, cpus in (("node0", "0-3"), ("node1", "4-7")):
        (tmp_path / "node" / node).mkdir(parents=True)
        (tmp_path / "node" / node / "cpulist").write_text(cpus + "\n")
    assert machine.topology(str(tmp_path), usable=list(range(8))) == {
        "known": True, "logical_cpus": 8, "physical_cores": 4, "sockets": 2, "numa_nodes": 2, "smt_per_core": 2}
    # A process bound to the first socket sees only that one.
    first = machine.topology(str(tmp_path), usable=[0, 1, 2, 3])
    assert (first["sockets"], first["numa_nodes"], first["physical_cores"]) == (1, 1, 2)
    assert machine.topology(str(tmp_path / "missing"), usable=[0, 1]) == {"logical_cpus": 2, "known": False}


def test_cpu_lists_are_parsed():
    assert machine.parse_cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert machine.parse_cpu_list("") == [] and machine.parse_cpu_list(None) == []
