"""foldnorm's version, written once: pyproject.toml and the package read it from here."""
__version__ = "0.2.0"
