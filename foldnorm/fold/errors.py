"""The exceptions foldnorm raises for models and files it refuses, as values with fields.

Kernel argument mistakes raise the built-in TypeError / ValueError; the fold pass, the model loader and
the verification raise these. A message that tells the user what to pass names the argument as a
placeholder (`<<shapes>>`, `<<no_verify>>`, ...): str() words it for Python (PYTHON_WORDS), and the
command line words it with its own flags (`worded`), turns it into one line on stderr and exit code 2 (1
for a failed verification).
"""

# How a Python caller passes what a message asks for; the command line has its own table.
PYTHON_WORDS = {
    "shapes": "shapes=",
    "shape_of": "shapes={%(input)r: [d0, d1, ...]}",
    "no_verify": "verify=False",
    "fold_through_qdq": "fold_through_qdq=True",
    "fold_input_initializers": "fold_input_initializers=True",
    "rewrite_bn": "rewrite_bn=True",
}


def word(text, words, fields=None):
    """`text` with each <<argument>> placeholder replaced by how `words` says it (fields fill %(name)s)."""
    for key, phrase in words.items():
        placeholder = "<<%s>>" % key
        if placeholder in text:
            text = text.replace(placeholder, phrase % (fields or {}) if "%(" in phrase else phrase)
    return text


class FoldError(ValueError):
    """A model or file foldnorm refuses, with a message the user can act on; keyword fields are kept as
    attributes (the data the message was made from)."""

    def __init__(self, message, **fields):
        super().__init__(message)
        self.template = message
        self.fields = fields
        for name, value in fields.items():
            setattr(self, name, value)

    def __reduce__(self):  # pickled with its fields (verification's child process sends it back)
        return _restore, (type(self), self.template, self.fields)

    def worded(self, words=None):
        """The message with its argument placeholders worded by `words` (PYTHON_WORDS when None)."""
        return word(self.template, PYTHON_WORDS if words is None else words, self.fields)

    def __str__(self):
        return self.worded()


class VerificationError(FoldError):
    """The folded model's outputs differ from the original's beyond the tolerance; `report` is the
    FoldReport with its verification, `outputs` the names of the outputs that diverged."""

    def __init__(self, message, report=None, outputs=()):
        super().__init__(message, report=report, outputs=tuple(outputs))


class VerifierCrashed(FoldError):
    """The process that ran the models for verification died: `model` names the model verified, `signal`
    the signal that ended the process (None when it exited with `exit_code` without a result)."""

    def __init__(self, model, *, signal=None, exit_code=None, detail=""):
        if signal is not None:
            how = "was killed by %s" % signal
        else:
            how = "exited with code %s without a result" % exit_code
        message = "verifying %s: the verifying process (onnxruntime) %s%s" % (model, how, detail)
        super().__init__(message, model=model, signal=signal, exit_code=exit_code)


def _restore(cls, template, fields):
    error = cls.__new__(cls)
    ValueError.__init__(error, template)
    error.template, error.fields = template, fields
    for name, value in fields.items():
        setattr(error, name, value)
    return error
