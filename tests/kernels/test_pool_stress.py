"""The thread pool's C stress test (tests/kernels/c/pool_stress.c), compiled here with the system's C
compiler and run plainly and under ThreadSanitizer: every unit's result checked while several threads call
at once and workers are held back at random.  Skipped where no compiler (or no TSan runtime) is found."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCES = [os.path.join(ROOT, "tests", "kernels", "c", "pool_stress.c"),
           os.path.join(ROOT, "src_c", "pool.c"), os.path.join(ROOT, "src_c", "pool_client.c")]
CC = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")

pytestmark = pytest.mark.skipif(CC is None or not os.path.isdir(os.path.join(ROOT, "src_c")),
                                reason="needs a C compiler and the sources")


def _build_and_run(tmp_path, flags):
    binary = str(tmp_path / "pool_stress")
    built = subprocess.run([CC, "-std=c11", "-Wall", "-Wextra", "-Werror", "-pthread", "-I",
                            os.path.join(ROOT, "src_c")] + flags + SOURCES + ["-o", binary],
                           capture_output=True, text=True)
    if built.returncode != 0:
        return built, None
    return built, subprocess.run([binary], capture_output=True, text=True, timeout=600)


def test_pool_stress(tmp_path):
    built, ran = _build_and_run(tmp_path, ["-O2"])
    assert built.returncode == 0, built.stderr
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout.startswith("failures 0 ")


def test_pool_stress_under_thread_sanitizer(tmp_path):
    built, ran = _build_and_run(tmp_path, ["-O1", "-g", "-fsanitize=thread"])
    if ran is None:
        pytest.skip("no ThreadSanitizer here: " + built.stderr.strip().splitlines()[-1][:200])
    assert ran.returncode == 0 and "WARNING: ThreadSanitizer" not in ran.stderr, ran.stdout + ran.stderr
    assert ran.stdout.startswith("failures 0 ")
