"""The calibration error class, in a module of its own so that the runner and the checkpoint
module (which the runner uses) can both raise it without importing each other."""
from accel.errors import AccelError


class CalibrationError(RuntimeError, AccelError):
    """Calibration cannot proceed (bad data, NaN activations, mismatched checkpoint)."""
