"""Errors that are the user's to fix: the CLI prints them as one line, without a traceback.

Anything else is a defect of maescale (or of a library) and keeps its traceback. Kept free of
heavy imports so that `maescale --help` stays instant.
"""

from __future__ import annotations

import importlib


class ConfigError(ValueError):
    """A user error in a config file or override, naming the key."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed by this run, with the reason and the way out."""


class StrategyError(RuntimeError):
    """The requested parallel strategy cannot run, or is not what is actually running."""


class DataError(ValueError):
    """The data a command points at cannot be used (no images, too few for one batch, none readable)."""


class MissingExtraError(ImportError):
    """An optional dependency the command needs is not installed; the message names the extra."""


USER_ERRORS = (ConfigError, CheckpointError, StrategyError, DataError, MissingExtraError, FileNotFoundError)


def install_hint(extra: str) -> str:
    return f"pip install 'maescale[{extra}]'"


def require_extra(module: str, extra: str, needed_for: str) -> None:
    """Import `module` now, or raise MissingExtraError saying which extra provides it."""
    try:
        importlib.import_module(module)
    except ImportError as error:
        raise MissingExtraError(
            f"{needed_for} needs {module}, which is not installed ({error}): {install_hint(extra)}"
        ) from error
