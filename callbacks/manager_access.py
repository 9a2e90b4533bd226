"""Find the Trainer's checkpoint manager from a health callback, by what it can do.

Health callbacks ask the manager for ``epoch_{n}_nan.pth``, error checkpoints and the newest
epoch checkpoint. They find it by duck typing, so that they work with any callback that offers
these methods and degrade to warnings only when the Trainer has none.
"""

from typing import Optional

import lightning as L

MANAGER_METHODS = ("save_nan_checkpoint", "save_error_checkpoint", "newest_epoch_checkpoint")


def find_checkpoint_manager(trainer: L.Trainer) -> Optional[object]:
    """The first callback of ``trainer`` with every method of :data:`MANAGER_METHODS`."""
    for callback in trainer.callbacks:
        if all(callable(getattr(callback, name, None)) for name in MANAGER_METHODS):
            return callback
    return None
