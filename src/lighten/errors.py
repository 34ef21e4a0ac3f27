"""Errors a user can cause. The CLI prints their message and exits 2; anything else is a bug."""


class LightenError(Exception):
    """Base for every mistake a user can make: the message says what to do."""


class SpecError(LightenError):
    """A format spec string that does not parse or names an unknown format."""


class ModelError(LightenError):
    """A model name or directory that cannot be resolved, read or is not supported."""


class DataError(LightenError):
    """Evaluation or calibration text that is missing, unreadable or too short."""
