"""foldnorm's one temporary folder: `foldnorm-XXXXXXXX` under the system temp dir.

Everything foldnorm writes outside the output's folder (a model too large for protobuf, handed to
onnxruntime through a file) goes under this one folder. It is made on first use, removed when the
command ends (`remove_scratch_folder`, which the command line calls) and, failing that, when the process
exits.
"""
import atexit
import os
import shutil
import tempfile
import threading

_lock = threading.Lock()
_folder = None


def scratch_folder():
    """The path of foldnorm's temporary folder, made (mode 0700) on the first call."""
    global _folder
    with _lock:
        if _folder is None or not os.path.isdir(_folder):
            _folder = tempfile.mkdtemp(prefix="foldnorm-")
        return _folder


def remove_scratch_folder():
    """Remove the temporary folder and everything in it (nothing happens when there is none)."""
    global _folder
    with _lock:
        if _folder is not None:
            shutil.rmtree(_folder, ignore_errors=True)
            _folder = None


atexit.register(remove_scratch_folder)
