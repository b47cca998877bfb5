"""The base class of every error accel raises for bad input.

Each error keeps the builtin base it always had (ConfigError is a ValueError, ArtifactError a
RuntimeError, ...), so existing `except ValueError` code keeps working; `except AccelError` catches
them all. The CLI prints any AccelError as one line and exits with code 2.
"""


class AccelError(Exception):
    """Bad input to accel (a config, an artifact, a model, data or an output path): the message
    names the problem and how to fix it."""
