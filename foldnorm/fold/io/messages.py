"""One readable line from a third-party error: onnxruntime's and onnx.checker's messages.

onnxruntime prefixes its messages with a status code ("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : ") and
often embeds the C++ source location and function signature that raised them; onnx.checker puts the
node's name on a separate "==> Context:" line after a blank one. A user needs neither the prefix nor the
source location, and does need the node's name: `one_line` keeps what says what is wrong and where.
"""
import re

MAX_CHARS = 400

_ORT_PREFIX = re.compile(r"\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*[A-Z_]+\s*:\s*")
# "/onnxruntime_src/.../reshape_helper.h:47 onnxruntime::ReshapeHelper::ReshapeHelper(const ...&, bool) "
_SOURCE_LOCATION = re.compile(
    r"(?:[A-Za-z]:)?[\w./\\+-]*[/\\][\w.+-]+\.(?:cc|cpp|cxx|h|hpp|c):\d+\s+"
    r"(?:[\w:~<>*&]+(?:\s*<[^<>]*>)?\([^()]*\)(?:\s*const)?\s*)?"
    # the failed assertion that often follows ("input_shape_size == size was false. ")
    r"(?:[^.]{0,200}? was false\.\s*)?"
)
_NODE_FAILED = re.compile(r"Non-zero status code returned while running (\S+) node\. Name:'([^']*)' Status Message:\s*")
_CONTEXT = "==> Context:"


def one_line(error):
    """The message of `error` (an exception or a string) as one line of at most MAX_CHARS characters."""
    text = error if isinstance(error, str) else str(error)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__ if not isinstance(error, str) else ""
    context = [line[len(_CONTEXT):].strip() for line in lines if line.startswith(_CONTEXT)]
    if context:
        main = [line for line in lines if not line.startswith(_CONTEXT)]
        text = "%s (%s)" % (" ".join(main), "; ".join(context))
    else:
        text = " ".join(lines)
    text = _ORT_PREFIX.sub("", text)
    text = _SOURCE_LOCATION.sub("", text)
    text = _NODE_FAILED.sub(lambda m: "%s node %r: " % (m.group(1), m.group(2)), text)
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) > MAX_CHARS:
        text = text[: MAX_CHARS - 3].rstrip() + "..."
    return text
