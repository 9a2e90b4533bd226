"""Command line of the product: ``python train.py {fit,validate,test,predict} --config ...``.

It is LightningCLI over :class:`GatedGNNModule` and :class:`MarketDataModule`, plus a
``training:`` section (:class:`TrainingConfig`) that configures the product's callbacks. The
data module's facts (nodes, features, windows, classes) are linked into the model, so a
config only names them once.

Resume: ``--ckpt_path checkpoints/epoch_5.pth`` continues with epoch 6 (epochs count from 0);
``--ckpt_path last`` takes the newest epoch or preemption file of ``training.save_dir`` that
loads and ``--ckpt_path best`` its ``best_model.pth`` (see :mod:`callbacks.resume`).

Preemption: SIGTERM or SIGUSR1 during ``fit`` saves ``epoch_{n}_preempt.pth`` at the next step
boundary and exits with code 75 (see :mod:`callbacks.preemption`); ``--ckpt_path last``
continues with the next batch. Several processes: ``--trainer.strategy=ddp
--trainer.devices=N`` (Lightning starts the processes), or torchrun / SLURM ``srun`` starting
one process per device with the same command.
"""

import logging
import sys
import warnings

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.checkpoint import CheckpointManager, ForeignCheckpointError
from callbacks.preemption import PREEMPTED_EXIT_CODE, PreemptionHandler
from callbacks.preflight import PreflightError
from callbacks.resume import check_resume_compatible, resolve_ckpt_path
from callbacks.training_config import TrainingConfig, build_callbacks
from datamodules.loading import DataFormatError
from datamodules.market_datamodule import MarketDataModule
from lit_models.lit_gated_gnn import GatedGNNModule

log = logging.getLogger("train")

# Errors that explain themselves: the command prints the message, not a traceback.
USER_ERRORS = (DataFormatError, ForeignCheckpointError, PreflightError)
USER_ERROR_EXIT_CODE = 2


class GatedGNNCLI(LightningCLI):
    """LightningCLI with the ``training:`` section and the data-to-model links."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(TrainingConfig, "training")
        parser.link_arguments("data.window_sizes", "model.window_sizes")
        parser.link_arguments("data.num_classes", "model.num_classes")
        parser.link_arguments("data.num_nodes", "model.num_nodes", apply_on="instantiate")
        parser.link_arguments("data.num_features", "model.num_features", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs):
        """The Trainer with the configured callbacks plus those of the ``training:`` section."""
        training = self._get(self.config_init, "training")
        callbacks = [self._get(self.config_init, key)
                     for key in self._parser(self.subcommand).callback_keys]
        callbacks += build_callbacks(training)
        # Last of the plain callbacks: at a preemption, the others have seen the batch.
        callbacks.append(PreemptionHandler())
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        if any(isinstance(callback, CheckpointManager) for callback in callbacks):
            # Lightning refuses a checkpoint callback under enable_checkpointing=False; with
            # ours in place it adds no ModelCheckpoint of its own either way.
            trainer_config["enable_checkpointing"] = True
        return self._instantiate_trainer(trainer_config, callbacks)

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path last``/``best`` to files of ``training.save_dir``; load the file.

        LightningCLI would replace the model settings with the checkpoint's. ``fit`` keeps the
        command line's instead, so that an intended change (dropout, say) takes effect and
        ``before_fit`` can fail on a changed shape and list the other differences; evaluation
        subcommands take the checkpoint's model settings, as LightningCLI does.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        arguments = self.config[subcommand]
        path, self._resume_checkpoint = resolve_ckpt_path(arguments.get("ckpt_path"),
                                                          arguments["training"].save_dir)
        arguments["ckpt_path"] = path
        if subcommand != "fit":
            super()._parse_ckpt_path()

    def before_fit(self) -> None:
        self._check_checkpoint()

    def before_validate(self) -> None:
        self._check_checkpoint()

    def before_test(self) -> None:
        self._check_checkpoint()

    def before_predict(self) -> None:
        self._check_checkpoint()

    def _check_checkpoint(self) -> None:
        """Fail before Lightning restores a checkpoint that does not fit the model."""
        checkpoint, self._resume_checkpoint = getattr(self, "_resume_checkpoint", None), None
        if checkpoint is not None:
            path = self.config_init[self.subcommand]["ckpt_path"]
            check_resume_compatible(checkpoint, path, self.model, self.datamodule,
                                    self.trainer.max_epochs)


def main(args=None) -> GatedGNNCLI:
    """Run the command line; ``args`` replaces ``sys.argv[1:]`` (for tests).

    Raises:
        SystemExit: a preemption signal stopped ``fit`` (code 75; see
            :class:`~callbacks.preemption.Preempted`).
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Our sampler records its position in every checkpoint and restores it, so a mid-epoch
    # resume is exact; Lightning cannot see that and would warn otherwise.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended "
                            "before the epoch ended")
    try:
        return GatedGNNCLI(
            GatedGNNModule,
            MarketDataModule,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except SIGTERMException as stop:
        if stop.code is None:
            # Lightning's own SIGTERM stop (before training took the signal over): nothing is
            # lost, and the exit code tells a supervisor to run the command again.
            raise SystemExit(PREEMPTED_EXIT_CODE) from stop
        raise


if __name__ == "__main__":
    try:
        main()
    except USER_ERRORS as error:
        log.error("%s: %s", type(error).__name__, error)
        sys.exit(USER_ERROR_EXIT_CODE)
