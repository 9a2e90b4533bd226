"""Out-of-memory recognition, and steps that retry an out-of-memory batch in halves.

Lightning recognises out-of-memory only from messages that mention CUDA. Here both device kinds
count: ``torch.OutOfMemoryError`` (CUDA) and the ``RuntimeError`` whose message says
``MPS backend out of memory`` (Apple GPUs), plus the older CUDA and CPU allocator messages.

:class:`BatchSplitter` runs a training step as forward and backward *inside* the step, so that
an out-of-memory error from either is caught there. On one, it drops the references to the
failed attempt, empties the device cache, and runs the failing piece again as two halves
(days of a cross-sectional list batch, rows of a pooled batch), at most ``max_halvings`` deep.
Later batches of the same stage start split as deep as the last retry had to go, so that one
oversized batch size costs one out-of-memory error, not one per step.
Each piece's gradient is weighted by its share of the batch's labelled nodes and summed,

    g = sum_p (n_p / N) * grad(mean cross-entropy of piece p)  =  grad(mean over the batch),

and the step returns a surrogate loss whose value is the batch loss and whose gradient is ``g``
(``loss + sum_w (w * g_w) - stop_gradient(sum_w (w * g_w))``), so that Lightning's backward,
clipping, accumulation and optimizer step see the same gradient as the whole batch would give.
"""

import gc
import logging
import traceback
from typing import Callable, Optional

import torch

from lit_models.batching import to_graph_batch

log = logging.getLogger(__name__)

OUT_OF_MEMORY_TEXTS = (
    "CUDA out of memory",
    "CUDA error: out of memory",
    "MPS backend out of memory",
    "DefaultCPUAllocator: can't allocate memory",
)
_OUT_OF_MEMORY_ERROR = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

# on_out_of_memory(error, stage, halvings, gave_up): called after the memory was released.
OutOfMemoryHandler = Callable[[BaseException, str, int, bool], None]


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a device (CUDA, MPS) or host allocator out-of-memory error."""
    if isinstance(error, _OUT_OF_MEMORY_ERROR):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error)
                                                   for text in OUT_OF_MEMORY_TEXTS)


def release_memory(error: Optional[BaseException] = None,
                   device: Optional[torch.device] = None) -> None:
    """Drop what a failed step still holds and return cached device memory to the driver.

    The traceback of ``error`` keeps every frame of the failed forward or backward alive, with
    its batch and activation tensors; clearing those frames' locals frees them. The message and
    line numbers of the traceback stay intact.
    """
    if error is not None and error.__traceback__ is not None:
        traceback.clear_frames(error.__traceback__)
    gc.collect()
    kind = device.type if device is not None else None
    if kind in (None, "cuda") and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    mps = getattr(torch.backends, "mps", None)
    if kind in (None, "mps") and mps is not None and mps.is_available():
        torch.mps.empty_cache()


def halve_batch(batch) -> Optional[list]:
    """Two halves of a list batch (by days) or of a pooled dict batch (by rows); None when the
    batch cannot be split (one day, one row, or a single day sample whose graph must stay whole).
    """
    if isinstance(batch, (list, tuple)):
        if len(batch) < 2:
            return None
        middle = len(batch) // 2
        return [list(batch[:middle]), list(batch[middle:])]
    if isinstance(batch, dict) and "edge_index" not in batch and torch.is_tensor(batch.get("x")):
        rows = batch["x"].shape[0]
        if rows < 2:
            return None
        middle = rows // 2
        halves = [{}, {}]
        for key, value in batch.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == rows:
                halves[0][key], halves[1][key] = value[:middle], value[middle:]
            else:
                halves[0][key] = halves[1][key] = value
        return halves
    return None


def count_labelled(batch) -> int:
    """Nodes with a label (``label >= 0``) in any accepted batch format."""
    samples = batch if isinstance(batch, (list, tuple)) else [batch]
    return int(sum(int((sample["label"] >= 0).sum()) for sample in samples))


class BatchSplitter:
    """Training and evaluation steps that survive an out-of-memory batch by splitting it.

    The module must offer ``_forward_loss(graph) -> (output, loss, num_labelled)``,
    ``_record(stage, graph, output, loss, num_labelled)`` (metric updates and logging) and
    ``_evaluation_step(stage, batch) -> dict``, as :class:`GatedGNNModule` does.

    Args:
        max_halvings: how deep a batch may be halved before the error is raised (3: eighths).
        on_out_of_memory: told of every out-of-memory error, after memory was released.
        to_graph: turns a batch (or a piece of one) into the module's graph input.
    """

    def __init__(self, max_halvings: int, on_out_of_memory: Optional[OutOfMemoryHandler],
                 to_graph: Callable = to_graph_batch):
        self.max_halvings = max_halvings
        self.on_out_of_memory = on_out_of_memory
        self.to_graph = to_graph
        self.start_halvings = {"train": 0, "val": 0, "test": 0}

    # -- training ------------------------------------------------------------------------

    def training_step(self, module: torch.nn.Module, batch) -> dict:
        """Forward and backward of ``batch`` (in pieces if need be); returns the step's dict
        with the surrogate ``loss`` described in the module docstring."""
        parameters = [p for p in module.parameters() if p.requires_grad]
        total_labelled = count_labelled(batch)
        gradients: list = [None] * len(parameters)
        pieces: list = []
        depth = self.start_halvings["train"]
        for piece in split_into(batch, depth):
            self._train_piece(module, piece, depth, parameters, total_labelled, gradients,
                              pieces)

        for graph, output, loss, num_labelled in pieces:
            module._record("train", graph, output, loss, num_labelled)
        loss = sum(_weight(n, total_labelled, len(pieces)) * loss for _, _, loss, n in pieces)
        return {
            "loss": _surrogate(loss, parameters, gradients),
            "gate": torch.cat([output.gate for _, output, _, _ in pieces]),
            "num_labelled": total_labelled,
        }

    def _train_piece(self, module, piece, halvings: int, parameters: list,
                     total_labelled: int, gradients: list, pieces: list) -> None:
        try:
            graph = self.to_graph(piece)
            output, loss, num_labelled = module._forward_loss(graph)
            weight = _weight(num_labelled, total_labelled, None)
            piece_gradients = _gradients(module, loss * weight, parameters)
        except Exception as error:
            graph = output = loss = None
            halves = self._after_out_of_memory(module, error, "train", piece, halvings)
            for half in halves:
                self._train_piece(module, half, halvings + 1, parameters, total_labelled,
                                  gradients, pieces)
            return

        for index, gradient in enumerate(piece_gradients):
            if gradient is not None:
                gradients[index] = (gradient if gradients[index] is None
                                    else gradients[index] + gradient)
        detached = type(output)(*(t.detach() for t in output))
        pieces.append((graph, detached, loss.detach(), num_labelled))

    # -- evaluation ----------------------------------------------------------------------

    def evaluation_step(self, module, stage: str, batch) -> dict:
        """``module._evaluation_step`` on ``batch``, or on its pieces after out-of-memory."""
        depth = self.start_halvings[stage]
        results = [self._evaluate_piece(module, stage, piece, depth)
                   for piece in split_into(batch, depth)]
        return results[0] if len(results) == 1 else _combine(results)

    def _evaluate_piece(self, module, stage: str, piece, halvings: int) -> dict:
        try:
            return module._evaluation_step(stage, piece)
        except Exception as error:
            halves = self._after_out_of_memory(module, error, stage, piece, halvings)
        return _combine([self._evaluate_piece(module, stage, half, halvings + 1)
                         for half in halves])

    # -- shared --------------------------------------------------------------------------

    def _after_out_of_memory(self, module, error: Exception, stage: str, batch,
                             halvings: int) -> list:
        """Release memory and return the halves to retry; re-raise when that is not possible."""
        if not is_out_of_memory(error):
            raise error
        release_memory(error, getattr(module, "device", None))
        halves = halve_batch(batch) if halvings < self.max_halvings else None
        if self.on_out_of_memory is not None:
            self.on_out_of_memory(error, stage, halvings + 1, halves is None)
        if halves is None:
            raise error
        if halvings + 1 > self.start_halvings[stage]:
            self.start_halvings[stage] = halvings + 1
            log.info("Out of memory: %s batches now run in %d pieces.", stage, 2 ** (halvings + 1))
        return halves


def split_into(batch, halvings: int) -> list:
    """``batch`` halved ``halvings`` times over (pieces that cannot be halved stay whole)."""
    pieces = [batch]
    for _ in range(halvings):
        pieces = [half for piece in pieces for half in (halve_batch(piece) or [piece])]
    return pieces


def _combine(results: list) -> dict:
    """One evaluation step's dict from those of its pieces (loss weighted by labelled nodes)."""
    total = sum(result["num_labelled"] for result in results)
    return {
        "loss": sum(_weight(r["num_labelled"], total, len(results)) * r["loss"]
                    for r in results),
        "gate": torch.cat([result["gate"] for result in results]),
        "num_labelled": total,
    }


def _weight(num_labelled: int, total_labelled: int, num_pieces: Optional[int]) -> float:
    """A piece's share of the batch loss: its labelled nodes over the batch's. Without any
    labelled node the losses are zeros; pieces then share equally (or 1 before the count)."""
    if total_labelled > 0:
        return num_labelled / total_labelled
    return 1.0 / num_pieces if num_pieces else 1.0


def _gradients(module, loss: torch.Tensor, parameters: list) -> tuple:
    """d loss / d parameters, unscaled; under a GradScaler the backward runs on the scaled loss
    (as Lightning's would) so that small 16-bit gradients do not underflow."""
    trainer = getattr(module, "_trainer", None)
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if scaler is None:
        return torch.autograd.grad(loss, parameters, allow_unused=True)
    scale = scaler.get_scale()
    gradients = torch.autograd.grad(scaler.scale(loss), parameters, allow_unused=True)
    return tuple(None if g is None else g / scale for g in gradients)


def _surrogate(loss: torch.Tensor, parameters: list, gradients: list) -> torch.Tensor:
    """A scalar with the value of ``loss`` whose gradient with respect to each parameter is
    the accumulated gradient (parameters that no piece used keep no gradient)."""
    terms = [(p * g).sum() for p, g in zip(parameters, gradients, strict=True) if g is not None]
    link = torch.stack(terms).sum() if terms else parameters[0].sum() * 0.0
    return loss.detach() + (link - link.detach())
