"""The alert register of a run: every training-health alert is warned, counted and logged.

A health callback calls :func:`raise_alert`; the :class:`AlertLog` callback of the Trainer then

* shows the message as a rank-zero warning (unless the caller already showed it),
* counts it by kind and logs the running count as ``alert_{kind}`` to every Lightning logger
  (CSV, TensorBoard), at the current global step,
* prints a one-line summary of all alerts when fit ends, normally or through an exception.

Without an ``AlertLog`` in the Trainer the message is still warned; nothing is counted.
"""

import logging
from typing import Optional

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

log = logging.getLogger(__name__)

METRIC_PREFIX = "alert_"


class AlertLog(Callback):
    """Counts alerts by kind, logs the counts, and summarises them when fit ends.

    Attributes:
        counts: alerts seen so far, by kind (kept across resumes through ``state_dict``).
        first_seen: ``"epoch e, step s"`` of each kind's first alert.
        messages: every message of this process, in order (not saved with checkpoints).
    """

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.first_seen: dict[str, str] = {}
        self.messages: list[tuple[str, str]] = []

    def record(self, trainer: L.Trainer, kind: str, message: str, warn: bool = True) -> int:
        """Count one alert of ``kind``, log the new count, and warn ``message``.

        Returns:
            How many alerts of this kind the run has seen, this one included.
        """
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.first_seen.setdefault(kind, _where(trainer))
        self.messages.append((kind, message))
        _log_counts(trainer, {kind: self.counts[kind]})
        if warn:
            rank_zero_warn(message)
        return self.counts[kind]

    def summary(self) -> str:
        """``Training health: ...``: every kind with its count and first occurrence."""
        if not self.counts:
            return "Training health: no alerts."
        total = sum(self.counts.values())
        parts = [f"{kind} x{count} (first at {self.first_seen.get(kind, '?')})"
                 for kind, count in sorted(self.counts.items())]
        return f"Training health: {total} alert{'s' if total != 1 else ''}: " + "; ".join(parts)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        if trainer.state.fn == "fit":
            self._finish(trainer)

    def _finish(self, trainer: L.Trainer) -> None:
        if self.counts:
            _log_counts(trainer, self.counts)
        rank_zero_info(self.summary())

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "first_seen": dict(self.first_seen)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.counts = dict(state_dict.get("counts", {}))
        self.first_seen = dict(state_dict.get("first_seen", {}))


def find_alert_log(trainer: L.Trainer) -> Optional[AlertLog]:
    """The Trainer's :class:`AlertLog`, or None."""
    for callback in trainer.callbacks:
        if isinstance(callback, AlertLog):
            return callback
    return None


def raise_alert(trainer: L.Trainer, kind: str, message: str, warn: bool = True) -> int:
    """Warn ``message`` and count it as an alert of ``kind`` when the Trainer has an AlertLog.

    Args:
        trainer: the running Trainer.
        kind: short snake_case name; the logged metric is ``alert_{kind}``.
        message: the user-facing text, starting with the fixed warning text where one exists.
        warn: False when the caller shows the message itself (or it is a repeat to count only).

    Returns:
        The run's count of this kind so far (1 without an AlertLog).
    """
    alerts = find_alert_log(trainer)
    if alerts is not None:
        return alerts.record(trainer, kind, message, warn=warn)
    if warn:
        rank_zero_warn(message)
    return 1


def _where(trainer: L.Trainer) -> str:
    return f"epoch {trainer.current_epoch}, step {trainer.global_step}"


def _log_counts(trainer: L.Trainer, counts: dict) -> None:
    metrics = {f"{METRIC_PREFIX}{kind}": float(count) for kind, count in counts.items()}
    for logger in trainer.loggers:
        try:
            logger.log_metrics(metrics, step=trainer.global_step)
        except Exception as error:  # a failing logger must never end the run
            log.debug("could not log %s to %s: %s", metrics, type(logger).__name__, error)
