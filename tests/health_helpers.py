"""Small fits and fault injectors shared by the training-health tests."""

from pathlib import Path

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from callbacks.alerts import AlertLog
from callbacks.health import health_callbacks
from callbacks.training_config import TrainingConfig
from datamodules.market_datamodule import MarketDataModule
from lit_models.lit_gated_gnn import GatedGNNModule

# A tiny-market configuration that learns within 3 epochs (val accuracy above the majority).
WINDOWS = [5, 10]
STEPS_PER_EPOCH = 18  # 144 training days of the tiny market, 8 days per batch


def build(market: Path, learning_rate: float = 5e-3, dropout: float = 0.1,
          num_center_nodes: int = 12, seed: int = 42):
    """Data module and model of a fit that takes about a second on one CPU core."""
    L.seed_everything(seed, verbose=False)
    datamodule = MarketDataModule(path=str(market), start_date=None, window_sizes=WINDOWS,
                                  batch_size=8, num_center_nodes=num_center_nodes)
    datamodule.setup("fit")
    module = GatedGNNModule(num_nodes=datamodule.num_nodes,
                            num_features=datamodule.num_features, window_sizes=WINDOWS,
                            hidden_size=16, num_heads=2, learning_rate=learning_rate,
                            dropout=dropout)
    return datamodule, module


def health(**overrides) -> list:
    """The health callbacks of a ``training:`` section with ``overrides``."""
    return health_callbacks(TrainingConfig(**overrides))


def make_trainer(run_dir: Path, callbacks: list, max_epochs: int = 3, **kwargs) -> L.Trainer:
    settings = {"accelerator": "cpu", "devices": 1, "max_epochs": max_epochs,
                "gradient_clip_val": 1.0, "enable_progress_bar": False,
                "enable_model_summary": False, "enable_checkpointing": False,
                "log_every_n_steps": 1, "logger": CSVLogger(str(run_dir / "logs"), name="health")}
    settings.update(kwargs)
    return L.Trainer(callbacks=callbacks, **settings)


def find(trainer: L.Trainer, kind: type):
    return next(callback for callback in trainer.callbacks if isinstance(callback, kind))


def alert_counts(trainer: L.Trainer) -> dict:
    return dict(find(trainer, AlertLog).counts)


def messages(trainer: L.Trainer, kind: str) -> list:
    return [text for name, text in find(trainer, AlertLog).messages if name == kind]


def metrics_csv(trainer: L.Trainer) -> pd.DataFrame:
    return pd.read_csv(Path(trainer.logger.log_dir) / "metrics.csv")


def model_state(module: L.LightningModule) -> dict:
    return {name: value.detach().clone() for name, value in module.model.state_dict().items()}


def same_state(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


class FakeManager(Callback):
    """Stands in for the checkpoint manager: the three methods the health callbacks call, and
    an ``epoch_{n}.pth`` with model and optimizer state after every training epoch."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.epoch_files: list = []
        self.nan_calls: list = []
        self.error_calls: list = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        path = self.folder / f"epoch_{trainer.current_epoch}.pth"
        torch.save({"epoch": trainer.current_epoch,
                    "model_state_dict": pl_module.model.state_dict(),
                    "optimizer_state_dict": trainer.optimizers[0].state_dict()}, path)
        self.epoch_files.append(path)

    def save_nan_checkpoint(self, trainer, pl_module, info: dict):
        self.nan_calls.append((trainer.current_epoch, dict(info), model_state(pl_module)))
        return self.folder / f"epoch_{trainer.current_epoch}_nan.pth"

    def save_error_checkpoint(self, trainer, pl_module, error, stage: str):
        self.error_calls.append((trainer.current_epoch, stage, type(error).__name__))
        return self.folder / f"epoch_{trainer.current_epoch}_error.pth"

    def newest_epoch_checkpoint(self):
        return self.epoch_files[-1] if self.epoch_files else None


class InjectNaNInput(Callback):
    """Writes NaN into one input feature of chosen training batches, before the step.

    Attributes:
        hits: (day, node_index, feature) of each injected value.
    """

    def __init__(self, targets, feature: int = 0):
        self.targets = set(targets)  # (epoch, batch_idx)
        self.feature = feature
        self.hits: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if (trainer.current_epoch, batch_idx) not in self.targets:
            return
        day = batch[0]
        row = int(torch.nonzero(day["has_input"] & (day["label"] >= 0))[0])
        day["x"][row, -1, self.feature] = float("nan")
        self.hits.append((int(day["day"]), int(day["node_index"][row]), self.feature))


class InjectInfGradient(Callback):
    """Writes Inf into one gradient entry after backward of chosen batches (finite loss)."""

    def __init__(self, targets):
        self.targets = set(targets)
        self._batch_idx = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._batch_idx = batch_idx

    def on_after_backward(self, trainer, pl_module) -> None:
        if (trainer.current_epoch, self._batch_idx) in self.targets:
            parameter = next(p for p in pl_module.parameters() if p.grad is not None)
            parameter.grad.view(-1)[0] = float("inf")


class WeightProbe(Callback):
    """Model weights and learning rate around chosen training batches, and batches seen."""

    def __init__(self, targets=()):
        self.targets = set(targets)
        self.before: dict = {}
        self.after: dict = {}
        self.lr_before: dict = {}
        self.lr_after: dict = {}
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        key = (trainer.current_epoch, batch_idx)
        if key in self.targets:
            self.before[key] = model_state(pl_module)
            self.lr_before[key] = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.batches += 1
        key = (trainer.current_epoch, batch_idx)
        if key in self.targets:
            self.after[key] = model_state(pl_module)
            self.lr_after[key] = trainer.optimizers[0].param_groups[0]["lr"]
