"""What is wrong with a model's path, told without loading onnx: the command line checks it before any
heavy import, and the reader (modelio) raises the same words."""
from pathlib import Path


def model_file_problem(path):
    """None when `path` names a regular file; else what is wrong with it, naming it."""
    path = Path(path)
    if not path.exists():
        return "%s: no such file" % path
    if path.is_dir():
        return "%s is a directory, not an ONNX model file" % path
    if not path.is_file():
        return "%s is not a regular file" % path
    return None
