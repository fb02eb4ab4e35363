"""Sharpness tracking during training: a warm-started tracker for any training loop, its crash-safe
log file, and a plot of the log.

    from hessian_eigenthings.tracking import SharpnessTracker, plot_log
"""

from .extras import TrackingContext, loss_and_gradient, preserved_rng_state
from .log import SharpnessRecord, TrackingLog, TrackingLogInUseError, TrackingLogWriteError, read_log
from .plot import plot_log
from .solve import TrackingSolver
from .tracker import SharpnessTracker

__all__ = [
    "SharpnessTracker",
    "SharpnessRecord",
    "TrackingContext",
    "TrackingLog",
    "TrackingLogWriteError",
    "TrackingLogInUseError",
    "TrackingSolver",
    "read_log",
    "plot_log",
    "loss_and_gradient",
    "preserved_rng_state",
]
