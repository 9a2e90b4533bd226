"""Write ``predict`` results to one CSV or Parquet file: a row per (date, node)."""

import logging
from pathlib import Path

import pandas as pd
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

log = logging.getLogger(__name__)


class PredictionFileWriter(BasePredictionWriter):
    """Collects every predict batch and writes ``date, node, score, predicted_class,
    prob_0 .. prob_{K-1}`` (plus ``label`` and ``fwd_return`` when known) at the end.

    Args:
        path: output file; ``.parquet`` writes Parquet, anything else CSV.
    """

    def __init__(self, path: str = "predictions.csv"):
        super().__init__(write_interval="epoch")
        self.path = Path(path)

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        if not predictions:
            log.warning("predict produced no rows; %s not written", self.path)
            return
        table = predictions_table(predictions, trainer.datamodule.dates,
                                  trainer.datamodule.nodes)
        path = self._path_for_rank(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".parquet":
            table.to_parquet(path, index=False)
        else:
            table.to_csv(path, index=False)
        log.info("Wrote %d predictions (%d days) to %s", len(table), table["date"].nunique(), path)

    def _path_for_rank(self, trainer) -> Path:
        """The configured path; with several processes, one file per rank beside it."""
        if trainer.world_size == 1:
            return self.path
        # TODO(one predictions file under DDP): gather every rank's rows to rank 0 and write
        # one table; until then each rank writes its share, so no row is lost or overwritten.
        return self.path.with_name(f"{self.path.stem}.rank{trainer.global_rank}{self.path.suffix}")


def predictions_table(predictions: list, dates, nodes) -> pd.DataFrame:
    """Flatten ``predict_step`` outputs into a table sorted by date and node."""
    columns = {key: torch.cat([batch[key] for batch in predictions])
               for key in predictions[0]}
    probabilities = columns.pop("probabilities").numpy()
    table = pd.DataFrame({
        "date": pd.DatetimeIndex(dates)[columns["day"].numpy()].strftime("%Y-%m-%d"),
        "node": [nodes[i] for i in columns["node_index"].tolist()],
        "score": columns["score"].numpy(),
        "predicted_class": columns["predicted_class"].numpy(),
    })
    for k in range(probabilities.shape[1]):
        table[f"prob_{k}"] = probabilities[:, k]
    label = columns["label"].numpy()
    table["label"] = pd.Series(label, dtype="Int64").where(label >= 0)
    table["fwd_return"] = columns["fwd_return"].numpy()
    return table.sort_values(["date", "node"], kind="stable").reset_index(drop=True)
