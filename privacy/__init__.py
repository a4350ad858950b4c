"""synthfed privacy: the distance guard.

Distance metrics (:mod:`privacy.metrics`), exact nearest-neighbour search pruned only by proven
lower bounds (:mod:`privacy.search`), the guard's decision (:mod:`privacy.guard`), calibration
of thresholds on the site's own data (:mod:`privacy.calibrate`), canaries
(:mod:`privacy.canaries`), the privacy report (:mod:`privacy.report`) and the site-trained
contrastive encoder (:mod:`privacy.encoder`, torch imported lazily).

Pure functions over arrays: this package knows nothing of files, command lines, ``node`` or
``protocols``. Its one error type is :class:`privacy.errors.GuardError`.
"""

from privacy.errors import GuardError

__all__ = ["GuardError"]
