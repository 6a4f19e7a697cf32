"""Build foldnorm's C kernels and their Cython wrappers.

Build switches (environment variables):
  FOLDNORM_REQUIRE_OPENMP=1  fail instead of building serial when the compiler lacks OpenMP
  FOLDNORM_NATIVE=1          add -march=native (the result only runs on CPUs like this one)
  FOLDNORM_SANITIZE=address  build with AddressSanitizer (see `make asan`)
  FOLDNORM_CYTHON_DEBUG=1    turn Cython's bounds/wraparound checks back on
  FOLDNORM_ONLY=a,b          build only these extension modules (e.g. _batch_norm), for development
"""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
SRC_C = os.path.join("src_c")

# Each private extension module and the C files it is built from; every one includes some of the headers.
HEADERS = sorted(glob.glob(os.path.join(SRC_C, "*.h")))
# pool.c, the thread pool, is in _runtime alone: the other modules run their regions on it (fn_pool.h).
EXTENSIONS = {
    "_runtime": ["runtime.c", "pool.c", "pool_client.c"],
    "_batch_norm": ["batch_norm.c", "bn_blocks.c", "pool_client.c"],
    "_layer_norm": ["layer_norm.c", "pool_client.c"],
    "_group_norm": ["group_norm.c", "pool_client.c"],
}


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _compiler():
    """The C compiler to probe: $CC, else the one Python was built with; None where neither is known
    (Windows builds have no CC in sysconfig and use MSVC through setuptools)."""
    configured = os.environ.get("CC") or sysconfig.get_config_var("CC") or ""
    words = configured.split()
    return words[0] if words else None


def _compiles_with_openmp(cc):
    """Compile and link a tiny OpenMP program; True when the compiler supports -fopenmp."""
    if cc is None:
        return False
    source = "#include <omp.h>\nint main(void){int n=0;\n#pragma omp parallel reduction(+:n)\nn+=1;\nreturn omp_get_max_threads()>0&&n>0?0:1;}\n"
    tmp = tempfile.mkdtemp()
    try:
        path = os.path.join(tmp, "probe.c")
        with open(path, "w") as f:
            f.write(source)
        result = subprocess.run(
            [cc, "-fopenmp", path, "-o", os.path.join(tmp, "probe")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return result.returncode == 0
    except OSError:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build_flags():
    cc = _compiler()
    cflags = ["-O3", "-std=c11", "-fno-math-errno", "-ffp-contract=fast", "-pthread"]
    ldflags = ["-pthread"]
    openmp = _compiles_with_openmp(cc)
    if openmp:
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    else:
        message = (
            "foldnorm: the compiler %r does not support OpenMP (-fopenmp), or none was found; building the kernels "
            "single-threaded. Set FOLDNORM_REQUIRE_OPENMP=1 to make this an error." % cc
        )
        if _env_flag("FOLDNORM_REQUIRE_OPENMP"):
            sys.exit(message.replace("building the kernels single-threaded", "refusing to build"))
        warnings.warn(message)
        cflags.append("-Wno-unknown-pragmas")
    if _env_flag("FOLDNORM_NATIVE"):
        cflags.append("-march=native")
    sanitize = os.environ.get("FOLDNORM_SANITIZE", "").strip()
    if sanitize:
        cflags += ["-fsanitize=" + sanitize, "-fno-omit-frame-pointer", "-g", "-O1"]
        cflags.remove("-O3")
        ldflags.append("-fsanitize=" + sanitize)
    return cc, cflags, ldflags, openmp


def _extensions():
    cc, cflags, ldflags, openmp = _build_flags()
    only = [name for name in os.environ.get("FOLDNORM_ONLY", "").split(",") if name]
    macros = [
        ("NPY_NO_DEPRECATED_API", "NPY_1_9_API_VERSION"),
        ("FOLDNORM_COMPILER", '"%s"' % (cc or "unknown")),
        ("FOLDNORM_CFLAGS", '"%s"' % " ".join(cflags)),
    ]
    modules = []
    for name, sources in EXTENSIONS.items():
        if only and name not in only:
            continue
        modules.append(
            Extension(
                "foldnorm.kernels." + name,
                sources=["foldnorm/kernels/%s.pyx" % name] + [os.path.join(SRC_C, s) for s in sources],
                depends=HEADERS,
                include_dirs=[SRC_C, numpy.get_include()],
                define_macros=macros,
                extra_compile_args=cflags,
                extra_link_args=ldflags,
            )
        )
    directives = {
        "language_level": 3,
        "boundscheck": False,
        "wraparound": False,
        "cdivision": True,
        "initializedcheck": False,
    }
    if _env_flag("FOLDNORM_CYTHON_DEBUG"):
        directives.update(boundscheck=True, wraparound=True, initializedcheck=True)
    return cythonize(modules, compiler_directives=directives, quiet=True)


setup(ext_modules=_extensions())
