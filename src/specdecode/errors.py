"""User-facing errors.

Everything a user can get wrong raises a subclass of :class:`SpecDecodeError`, with a message
that fits on one line and names the offending value. The CLI prints ``error: <message>`` and
exits non-zero for these; anything else is a bug and keeps its traceback.
"""


class SpecDecodeError(ValueError):
    """Base class for invalid input, configuration or files."""


class ModelLoadError(SpecDecodeError):
    """A model id, path or file that cannot be loaded."""


class VocabularyMismatchError(SpecDecodeError):
    """A draft whose token ids do not mean the same thing as the target's."""


class InvalidSettingError(SpecDecodeError):
    """A generation or method parameter outside its valid range."""


class PromptError(SpecDecodeError):
    """An empty prompt, or one that does not fit in the model's context."""
