"""Errors that are the user's to fix: the CLI prints them as one line, without a traceback.

Kept free of heavy imports so that `maescale --help` stays instant.
"""


class ConfigError(ValueError):
    """A user error in a config file or override, naming the key."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed by this run, with the reason and the way out."""


class StrategyError(RuntimeError):
    """The requested parallel strategy cannot run, or is not what is actually running."""


USER_ERRORS = (ConfigError, CheckpointError, StrategyError, FileNotFoundError)
