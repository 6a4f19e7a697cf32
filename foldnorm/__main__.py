"""Where the `foldnorm` command and `python -m foldnorm` start.

This module imports nothing of its own, so that Ctrl-C at any point of the start-up that follows, the
imports of the command line and of the libraries a command loads included, ends in one line and exit
code 130 rather than a traceback (main() does the same for everything after it has started).
"""
import sys


def run():
    """Load the command line and run it with sys.argv; returns the exit code."""
    try:
        from .cli import main

        return main()  # which turns Ctrl-C into the same line itself once it runs
    except KeyboardInterrupt:
        print("foldnorm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run())
