"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class QembedError(Exception):
    """An error caused by the user's input or environment, with a message that says what to do."""


class ModelNotFoundError(QembedError):
    """A model name is neither a local directory nor reachable on the hub."""
