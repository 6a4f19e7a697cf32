"""The exceptions foldnorm raises for models and files it refuses.

Kernel argument mistakes raise the built-in TypeError / ValueError; the fold pass, the model loader and
the verification raise these, and the command line turns each into one line on stderr and exit code 2
(1 for a failed verification).
"""


class FoldError(ValueError):
    """A model or file foldnorm refuses, with a message the user can act on."""


class VerificationError(FoldError):
    """The folded model's outputs differ from the original's beyond the tolerance."""

    def __init__(self, message, report=None):
        super().__init__(message)
        self.report = report
