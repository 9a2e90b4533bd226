"""The training-health callbacks of the ``training:`` section, in the order they must run.

* :class:`GradientNormMonitor` logs ``grad_norm`` and warns on large norms; it runs before the
  NaN guard so that a bad step's norm is still logged;
* :class:`NanGuard` catches NaN/Inf before the optimizer step (``nan_policy``);
* :class:`OutOfMemoryGuard` handles out-of-memory (``oom_policy``);
* :class:`MemoryMonitor`, :class:`ValidationAccuracyMonitor`, :class:`ProgressMonitor` warn;
* :class:`AlertLog` counts, logs and summarises every alert of the others.
"""

from callbacks.accuracy_monitor import ValidationAccuracyMonitor
from callbacks.alerts import AlertLog
from callbacks.gradient_monitor import GradientNormMonitor
from callbacks.memory_monitor import MemoryMonitor
from callbacks.nan_guard import NanGuard
from callbacks.oom import OutOfMemoryGuard
from callbacks.progress_monitor import ProgressMonitor


def health_callbacks(config) -> list:
    """The health callbacks configured from a ``TrainingConfig`` (or any object with its
    ``nan_policy``, ``max_consecutive_nan``, ``grad_norm_warn``, ``min_val_accuracy``,
    ``oom_policy``, ``memory_warn_fraction`` and ``patience`` attributes).

    Raises:
        ValueError: a value out of range or an unknown policy, naming the key and the choices.
    """
    return [
        GradientNormMonitor(config.grad_norm_warn),
        NanGuard(config.nan_policy, config.max_consecutive_nan),
        OutOfMemoryGuard(config.oom_policy),
        MemoryMonitor(config.memory_warn_fraction),
        ValidationAccuracyMonitor(config.min_val_accuracy),
        ProgressMonitor(config.patience),
        AlertLog(),
    ]
