"""Cache sizes from synthetic sysfs and lscpu text, and the two shape sets sized from them."""
import pytest

from benchmarks import cache_memory, machine

MIB = 1 << 20


def _cache(root, cpu, index, level, kind, size, shared):
    folder = root / ("cpu%d" % cpu) / "cache" / ("index%d" % index)
    folder.mkdir(parents=True)
    for name, value in (("level", level), ("type", kind), ("size", size), ("shared_cpu_list", shared)):
        (folder / name).write_text("%s\n" % value)


def _four_cpus(root):
    # Per core: L1d 48K and L1i 32K; L2 2 MiB per pair of cores; one 32 MiB L3.
    for cpu in range(4):
        _cache(root, cpu, 0, 1, "Data", "48K", cpu)
        _cache(root, cpu, 1, 1, "Instruction", "32K", cpu)
        _cache(root, cpu, 2, 2, "Unified", "2048K", "0-1" if cpu < 2 else "2-3")
        _cache(root, cpu, 3, 3, "Unified", "32768K", "0-3")


def test_caches_are_counted_per_instance_and_in_total_over_the_usable_cpus(tmp_path):
    _four_cpus(tmp_path)
    assert machine.caches(str(tmp_path), usable=[0, 1, 2, 3]) == [
        {"name": "L1d", "level": 1, "bytes_per_instance": 48 << 10, "instances": 4, "bytes_total": 192 << 10},
        {"name": "L2", "level": 2, "bytes_per_instance": 2 * MIB, "instances": 2, "bytes_total": 4 * MIB},
        {"name": "L3", "level": 3, "bytes_per_instance": 32 * MIB, "instances": 1, "bytes_total": 32 * MIB},
    ]
    bound = machine.caches(str(tmp_path), usable=[2, 3])
    assert [(c["name"], c["instances"]) for c in bound] == [("L1d", 2), ("L2", 1), ("L3", 1)]
    assert machine.last_level_cache(bound)["bytes_total"] == 32 * MIB
    assert machine.caches_text(bound) == "L1d 48 KiB x 2, L2 2 MiB x 1, L3 32 MiB x 1"
    assert machine.last_level_cache([]) is None and machine.caches_text([]) == "unknown"


LSCPU = """Architecture:                            x86_64
L1d cache:                               96 KiB (2 instances)
L1i cache:                               128 KiB (2 instances)
L2 cache:                                4 MiB (2 instances)
L3 cache:                                480 MiB (1 instance)
NUMA node(s):                            1
"""


def test_lscpu_is_read_where_sysfs_has_no_caches(tmp_path, monkeypatch):
    assert [(c["name"], c["bytes_per_instance"], c["instances"], c["bytes_total"])
            for c in machine.parse_lscpu_caches(LSCPU)] == [
        ("L1d", 48 << 10, 2, 96 << 10), ("L2", 2 * MIB, 2, 4 * MIB), ("L3", 480 * MIB, 1, 480 * MIB)]
    # An older lscpu gives one instance's size and no count.
    assert machine.parse_lscpu_caches("L2 cache:  1024K\n") == [
        {"name": "L2", "level": 2, "bytes_per_instance": MIB, "instances": 1, "bytes_total": MIB}]
    monkeypatch.setattr(machine, "lscpu_caches", lambda: machine.parse_lscpu_caches(LSCPU))
    assert machine.caches(str(tmp_path / "none"), usable=[0, 1])[-1]["bytes_total"] == 480 * MIB


@pytest.mark.parametrize("text, nbytes", [("48K", 48 << 10), ("491520K", 480 * MIB), ("480 MiB", 480 * MIB),
                                          ("32768 KB", 32 * MIB), ("1.5 GiB", 3 << 29), ("512", 512)])
def test_cache_sizes_are_parsed_as_sysfs_and_lscpu_write_them(text, nbytes):
    assert machine.parse_size(text) == nbytes


def test_a_size_that_is_not_one_is_refused():
    for bad in ("", "K", "12 parsecs", None):
        with pytest.raises(ValueError, match="not a cache size"):
            machine.parse_size(bad)


def test_available_memory_is_read_from_meminfo(tmp_path):
    (tmp_path / "meminfo").write_text("MemTotal:       24000000 kB\nMemAvailable:   1000 kB\n")
    assert machine.available_memory(str(tmp_path / "meminfo")) == 1000 * 1024
    assert machine.available_memory(str(tmp_path / "missing")) is None


def test_the_sets_fit_in_the_last_level_cache_and_exceed_it_when_memory_allows():
    fit, beyond, note = cache_memory.tensor_sizes(480 * MIB, 20 << 30)
    assert (fit, beyond, note) == (60 * MIB, 960 * MIB, None)
    # 2 GiB available: half of it over the tensors a case holds keeps them under a 480 MiB cache.
    fit, beyond, note = cache_memory.tensor_sizes(480 * MIB, 2 << 30)
    assert beyond == (1 << 30) // cache_memory.RESIDENT_TENSORS and beyond < 480 * MIB
    assert note.startswith("the larger set cannot exceed the last-level cache (480 MiB): 2 GiB of memory")
    # Capped but still beyond a small cache: no note.
    assert cache_memory.tensor_sizes(128 * MIB, 2 << 30)[1:] == ((1 << 30) // cache_memory.RESIDENT_TENSORS, None)
    fit, beyond, note = cache_memory.tensor_sizes(None, None)
    assert (fit, beyond) == (4 * MIB, 64 * MIB) and "cache sizes are unknown" in note


@pytest.mark.parametrize("kernel", ["batch_norm", "batch_norm_train", "batch_norm_backward", "layer_norm"])
def test_shapes_hold_about_the_bytes_asked_for(kernel):
    for nbytes in (60 * MIB, 960 * MIB):
        case = cache_memory.cases(nbytes, nbytes, [kernel])[0][1]
        assert case.kernel == kernel and abs(case.elements * 4 - nbytes) <= 0.01 * nbytes
    assert [name for name, _ in cache_memory.cases(1, 2)] == ["cache"] * 4 + ["memory"] * 4
