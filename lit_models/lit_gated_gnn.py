"""LightningModule: loss, accuracy, IC and RankIC, optimizer and scheduler around GatedGraphNet.

What the module exposes to callbacks (they read, never re-run the model):

* ``training_step`` and ``validation_step`` return a dict with ``loss``, ``gate`` (gate value of
  every node with input, detached) and ``num_labelled`` (nodes that entered the loss); Lightning
  hands it to ``on_train_batch_end`` / ``on_validation_batch_end`` as ``outputs``;
* ``self.model`` is the bare ``GatedGraphNet`` whose ``state_dict`` loads without Lightning;
* ``enable_batch_splitting(splitter)`` (used for ``training.oom_policy: split``) routes the
  steps through a :class:`BatchSplitter`, which retries an out-of-memory batch in halves;
* logged names match the checkpoint keys: ``train_loss``, ``train_accuracy``, ``val_loss``,
  ``val_accuracy``, ``val_IC``, ``val_RankIC``, ``val_ICIR``, ``val_RankICIR`` (and ``test_*``).
"""

import logging
from typing import Optional

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from lit_models.batch_splitting import BatchSplitter
from lit_models.batching import GraphBatch, to_graph_batch
from lit_models.gated_gnn import GatedGraphNet
from lit_models.metrics import daily_ic

log = logging.getLogger(__name__)

SCHEDULERS = ("none", "cosine", "step", "plateau")


class GatedGNNModule(L.LightningModule):
    """Classifies each node's forward return into quantile classes and ranks nodes by score.

    Args:
        num_nodes: nodes in the universe (linked from the data module).
        num_features: feature channels per bar (linked from the data module).
        window_sizes: lookback of each temporal scale (linked from the data module).
        num_classes: quantile classes (linked from the data module).
        hidden_size: width of the hidden vectors.
        encoder: temporal encoder per scale, ``gru`` or ``transformer``.
        num_heads: attention heads.
        num_graph_layers: graph attention layers.
        use_node_gate: learn the per-node gate between history and embedding.
        embedding_fusion_alpha: embedding weight when the gate is off.
        dropout: dropout rate.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        scheduler: ``none``, ``cosine`` (to ``min_learning_rate`` over ``max_epochs``),
            ``step`` (times ``scheduler_gamma`` every ``scheduler_step_size`` epochs) or
            ``plateau`` (times ``scheduler_gamma`` when ``val_loss`` stalls for
            ``scheduler_step_size`` epochs).
        scheduler_step_size: epochs per step (``step``) or patience (``plateau``).
        scheduler_gamma: learning-rate factor of ``step`` and ``plateau``.
        min_learning_rate: floor of ``cosine`` and ``plateau``.
    """

    def __init__(
        self,
        num_nodes: int,
        num_features: int,
        window_sizes: list[int] = [20, 40, 80],
        num_classes: int = 5,
        hidden_size: int = 64,
        encoder: str = "gru",
        num_heads: int = 4,
        num_graph_layers: int = 1,
        use_node_gate: bool = True,
        embedding_fusion_alpha: float = 0.5,
        dropout: float = 0.1,
        learning_rate: float = 5e-5,
        weight_decay: float = 1e-4,
        scheduler: str = "cosine",
        scheduler_step_size: int = 10,
        scheduler_gamma: float = 0.5,
        min_learning_rate: float = 1e-6,
    ):
        super().__init__()
        if scheduler not in SCHEDULERS:
            raise ValueError(f"model.scheduler must be one of {SCHEDULERS}, got {scheduler!r}.")
        self.save_hyperparameters()
        self.model = GatedGraphNet(
            num_nodes, num_features, window_sizes, num_classes, hidden_size, encoder,
            num_heads, num_graph_layers, use_node_gate, embedding_fusion_alpha, dropout,
        )
        self.accuracy = torch.nn.ModuleDict({
            f"{stage}_accuracy": MulticlassAccuracy(num_classes, average="micro")
            for stage in ("train", "val", "test")
        })
        self._ic_inputs = {"val": [], "test": []}
        self.batch_splitter: Optional[BatchSplitter] = None

    def enable_batch_splitting(self, splitter: Optional[BatchSplitter]) -> None:
        """Run training, validation and test steps through ``splitter`` (None: directly).

        The out-of-memory callback sets it for ``training.oom_policy: split``; the steps'
        returned dicts and logged metrics stay the same.
        """
        self.batch_splitter = splitter

    def forward(self, batch) -> torch.Tensor:
        """Scores of every node of ``batch`` (any accepted batch format)."""
        graph = to_graph_batch(batch)
        return self._run(graph).scores

    def _run(self, graph: GraphBatch):
        return self.model(graph.x, graph.bar_mask, graph.has_input, graph.node_index,
                          graph.edge_index)

    def _loss_and_accuracy(self, stage: str, batch):
        graph = to_graph_batch(batch)
        output, loss, num_labelled = self._forward_loss(graph)
        self._record(stage, graph, output, loss, num_labelled)
        return graph, output, loss, num_labelled

    def _forward_loss(self, graph: GraphBatch):
        """Model output, mean cross-entropy over labelled nodes, and their count."""
        output = self._run(graph)
        labelled = graph.labelled
        num_labelled = int(labelled.sum())
        if num_labelled == 0:
            # No node of these days has a label: nothing to learn, but keep the graph alive.
            loss = output.logits.sum() * 0.0
        else:
            loss = F.cross_entropy(output.logits[labelled], graph.label[labelled])
        return output, loss, num_labelled

    def _record(self, stage: str, graph: GraphBatch, output, loss: torch.Tensor,
                num_labelled: int) -> None:
        """Update the accuracy and log loss and accuracy, weighted by labelled nodes."""
        if stage == "train" and not torch.isfinite(loss):
            # The NaN guard reports this step and drops its update; leaving it out keeps the
            # epoch's train_loss the mean of the steps that trained, not NaN.
            return
        if num_labelled:
            labelled = graph.labelled
            self.accuracy[f"{stage}_accuracy"].update(output.logits[labelled].detach(),
                                                      graph.label[labelled])
        batch_size = max(num_labelled, 1)
        # sync_dist: every process must see the same epoch loss (the plateau scheduler and
        # the best-model choice read it); a no-op in one process.
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=batch_size, sync_dist=True)
        self.log(f"{stage}_accuracy", self.accuracy[f"{stage}_accuracy"], on_step=False,
                 on_epoch=True, prog_bar=True, batch_size=batch_size)

    def training_step(self, batch, batch_idx: int) -> dict:
        if self.batch_splitter is not None:
            return self.batch_splitter.training_step(self, batch)
        _, output, loss, num_labelled = self._loss_and_accuracy("train", batch)
        return {"loss": loss, "gate": output.gate.detach(), "num_labelled": num_labelled}

    def validation_step(self, batch, batch_idx: int) -> dict:
        if self.batch_splitter is not None:
            return self.batch_splitter.evaluation_step(self, "val", batch)
        return self._evaluation_step("val", batch)

    def test_step(self, batch, batch_idx: int) -> dict:
        if self.batch_splitter is not None:
            return self.batch_splitter.evaluation_step(self, "test", batch)
        return self._evaluation_step("test", batch)

    def _evaluation_step(self, stage: str, batch) -> dict:
        graph, output, loss, num_labelled = self._loss_and_accuracy(stage, batch)
        self._ic_inputs[stage].append(
            torch.stack([graph.day.double(), output.scores.double(), graph.fwd_return.double()])
            .cpu()
        )
        return {"loss": loss, "gate": output.gate.detach(), "num_labelled": num_labelled}

    def on_validation_epoch_start(self) -> None:
        self._ic_inputs["val"].clear()

    def on_test_epoch_start(self) -> None:
        self._ic_inputs["test"].clear()

    def on_validation_epoch_end(self) -> None:
        self._log_ic("val")

    def on_test_epoch_end(self) -> None:
        self._log_ic("test")

    def _log_ic(self, stage: str) -> None:
        rows = self._ic_inputs[stage]
        distributed = self._trainer is not None and self.trainer.world_size > 1 \
            and dist.is_available() and dist.is_initialized()
        if not rows and not distributed:
            return
        rows = torch.cat(rows, dim=1) if rows else torch.zeros((3, 0), dtype=torch.float64)
        self._ic_inputs[stage].clear()
        if distributed:
            rows = rows_of_every_rank(rows, self.trainer.world_size)
            if rows.shape[1] == 0:
                return
        day, score, forward = rows.numpy()  # (3, node-days)
        result = daily_ic(day, score, forward)
        for name, value in (("IC", result.ic), ("RankIC", result.rank_ic),
                            ("ICIR", result.icir), ("RankICIR", result.rank_icir)):
            self.log(f"{stage}_{name}", float(value), prog_bar=name in ("IC", "RankIC"))
        self.log(f"{stage}_IC_days", float(result.days_used))
        self.log(f"{stage}_IC_days_skipped", float(result.days_skipped))

    def predict_step(self, batch, batch_idx: int) -> dict:
        """Per node: signal day, node position, score, predicted class and probabilities."""
        graph = to_graph_batch(batch)
        output = self._run(graph)
        probabilities = torch.softmax(output.logits, dim=-1)
        return {
            "day": graph.day.cpu(),
            "node_index": graph.node_index.cpu(),
            "score": output.scores.cpu(),
            "predicted_class": probabilities.argmax(dim=-1).cpu(),
            "probabilities": probabilities.cpu(),
            "label": graph.label.cpu(),
            "fwd_return": graph.fwd_return.cpu(),
        }

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.learning_rate,
                                      weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return optimizer
        if hp.scheduler == "cosine":
            epochs = self.trainer.max_epochs if self.trainer.max_epochs not in (None, -1) else 100
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=max(epochs, 1), eta_min=hp.min_learning_rate)
        elif hp.scheduler == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(
                optimizer, step_size=hp.scheduler_step_size, gamma=hp.scheduler_gamma)
        else:
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=hp.scheduler_gamma,
                patience=hp.scheduler_step_size, min_lr=hp.min_learning_rate)
            return {"optimizer": optimizer,
                    "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss"}}
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def rows_of_every_rank(rows: torch.Tensor, world_size: int) -> torch.Tensor:
    """The (day, score, return) rows of every rank, each day once.

    Under DDP each rank evaluates its share of the days, and Lightning's distributed sampler
    repeats a few days to give every rank as many: a day's rows are kept from the lowest rank
    that has them. Every rank must call it (a collective) and gets the same result.

    Args:
        rows: this rank's rows.  # (3, node-days) float64: day, score, forward return
        world_size: number of ranks.

    Returns:
        Every rank's rows, by rank.  # (3, node-days of all ranks)
    """
    gathered = [None] * world_size
    dist.all_gather_object(gathered, rows.cpu())
    kept, seen = [], torch.zeros(0, dtype=rows.dtype)
    for part in gathered:
        fresh = ~torch.isin(part[0], seen)
        kept.append(part[:, fresh])
        seen = torch.cat([seen, part[0, fresh].unique()])
    return torch.cat(kept, dim=1)
