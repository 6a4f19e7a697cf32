"""A model session's temporary folder: `foldnorm-XXXXXXXX` under the system temp dir.

Everything foldnorm writes outside the output's folder (a copy of the model for the checker, a model handed to
the verifying process through a file) goes under the folder of the session that needs it. The folder is
made on first use and removed, with everything in it, when its owner closes it.
"""
import contextlib
import shutil
import tempfile


class Scratch:
    """A temporary folder made on first use (mode 0700) and removed by close(); a context manager."""

    def __init__(self):
        self._folder = None

    @property
    def folder(self):
        """The folder's path, made on the first call."""
        if self._folder is None:
            self._folder = tempfile.mkdtemp(prefix="foldnorm-")
        return self._folder

    def close(self):
        """Remove the folder and everything in it (nothing happens when there is none)."""
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


@contextlib.contextmanager
def temporary_folder(scratch=None):
    """A new, empty folder for the duration of a `with` block, inside `scratch`'s folder when one is given
    (else on its own under the system temp dir); the folder and everything in it is removed when the
    block ends."""
    folder = tempfile.mkdtemp(dir=scratch.folder if scratch is not None else None, prefix="foldnorm-")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
