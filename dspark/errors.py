"""Error types. Every user-facing failure is one of these, with a message naming the culprit
(file, tensor, parameter); the CLI turns them into a one-line error and a non-zero exit code."""


class DSparkError(Exception):
    """Base class for errors caused by the user's input rather than by a bug."""


class ConfigError(DSparkError):
    """A configuration file or value is malformed, unknown or out of range."""


class CheckpointError(DSparkError):
    """A model folder is missing, corrupt, or does not match its config."""


class UnsupportedModelError(CheckpointError):
    """The checkpoint's architecture is not one dspark implements."""


class RequestError(DSparkError):
    """A generation request is invalid (bad sampling parameter, prompt too long, ...)."""


class CacheCapacityError(DSparkError):
    """The paged KV cache has no free block left for a sequence."""


class NumericalError(DSparkError):
    """A model produced non-finite values (NaN or inf) at run time; nothing computed from them is emitted."""
