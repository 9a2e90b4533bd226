"""Fault injection for the process-level tests: kills, signals, NaN and exceptions in real fits.

Importing torch and Lightning costs several seconds per process, too much for tests that kill
and restart training dozens of times. :class:`ForkServer` starts one server process that imports
everything once and then forks a fresh child for each run (one child per rank for the
distributed runs, started the way torchrun starts them); ``ddp_script.py`` runs the real command
line, where Lightning starts the second process itself. Both install the faults of a spec:

* ``kill``: ``{"event", "count", "signal", "rank", "fraction"}``: send ``signal`` (default
  SIGKILL) to the process itself at the ``count``-th ``event`` of the process: ``train_step``,
  ``val_step`` (before the step runs), ``write`` (inside a checkpoint write, after ``fraction``
  of its bytes), ``fsync``, ``replace`` (a finished temporary file not yet renamed),
  ``replaced`` (renamed, the folder not yet fsynced) or ``unlink`` (a pruned file);
* ``nan``: ``{"rank", "epoch", "batch"}``: that training step's loss becomes NaN;
* ``raise``: ``{"rank", "epoch", "batch", "stage"}``: that ``train``/``val`` step raises
  :class:`InjectedFault`;
* ``record``: a path prefix: each rank writes ``{prefix}.rank{r}.json`` (the training batches it
  ran and the files it saved) and ``{prefix}.rank{r}.pt`` (its final weights);
* ``metrics``: a path: the callback metrics of the run, as JSON (rank 0).
"""

import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
READY = "fork-server-ready"


class InjectedFault(RuntimeError):
    """The exception a ``raise`` fault throws."""


# ---------------------------------------------------------------- in the training process

class _Faults:
    def __init__(self, spec: dict):
        self.spec = spec
        self.counts: dict = {}
        self.batches: list = []
        self.saves: list = []
        self.module = None
        self.cli = None

    def rank(self) -> int:
        if self.module is not None and self.module._trainer is not None:
            return self.module.global_rank
        return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))

    def event(self, name: str) -> bool:
        """Count ``name``; True when this is the instant of the ``kill`` fault."""
        self.counts[name] = self.counts.get(name, 0) + 1
        kill = self.spec.get("kill")
        if not kill or kill["event"] != name or self.counts[name] != kill["count"]:
            return False
        return kill.get("rank") is None or kill["rank"] == self.rank()

    def fire(self) -> None:
        number = getattr(signal, self.spec["kill"].get("signal", "SIGKILL"))
        if number == signal.SIGKILL:
            sys.stdout.flush()
            sys.stderr.flush()
        os.kill(os.getpid(), number)

    def matches(self, key: str, module, batch_idx: int, stage: str = "train") -> bool:
        fault = self.spec.get(key)
        return bool(fault) and fault.get("stage", "train") == stage \
            and fault["rank"] == module.global_rank and fault["epoch"] == module.current_epoch \
            and fault["batch"] == batch_idx and not module.trainer.sanity_checking

    def finish(self) -> None:
        prefix = self.spec.get("record")
        if prefix:
            rank = self.rank()
            Path(f"{prefix}.rank{rank}.json").write_text(
                json.dumps({"batches": self.batches, "saves": self.saves}))
            if self.module is not None:
                import torch
                torch.save(self.module.model.state_dict(), f"{prefix}.rank{rank}.pt")
        if self.spec.get("metrics") and self.cli is not None and self.rank() == 0:
            metrics = {name: float(value) for name, value in
                       self.cli.trainer.callback_metrics.items()}
            Path(self.spec["metrics"]).write_text(json.dumps(metrics))


def install_faults(spec: dict) -> _Faults:
    """Patch the step methods and the checkpoint writes of this process as ``spec`` says."""
    import torch

    import callbacks.checkpoint as checkpoint_module
    from lit_models.lit_gated_gnn import GatedGNNModule

    faults = _Faults(spec)
    training_step, validation_step = GatedGNNModule.training_step, GatedGNNModule.validation_step

    def patched_training_step(self, batch, batch_idx):
        faults.module = self
        if faults.event("train_step"):
            faults.fire()
        if faults.matches("raise", self, batch_idx):
            raise InjectedFault(f"injected train failure on rank {self.global_rank}")
        if spec.get("record"):
            faults.batches.append([self.current_epoch, batch_idx, _batch_key(batch)])
        output = training_step(self, batch, batch_idx)
        if faults.matches("nan", self, batch_idx):
            output["loss"] = output["loss"] * float("nan")
        return output

    def patched_validation_step(self, batch, batch_idx):
        faults.module = self
        if faults.event("val_step"):
            faults.fire()
        if faults.matches("raise", self, batch_idx, stage="val"):
            raise InjectedFault(f"injected val failure on rank {self.global_rank}")
        return validation_step(self, batch, batch_idx)

    GatedGNNModule.training_step = patched_training_step
    GatedGNNModule.validation_step = patched_validation_step
    _patch_writes(faults, torch, checkpoint_module)
    return faults


def _batch_key(batch) -> list:
    """What a training batch holds: (day, nodes) of each day sample."""
    return [[int(sample["day"]), sample["node_index"].tolist()] for sample in batch]


def _patch_writes(faults: _Faults, torch, checkpoint_module) -> None:
    real_save, real_fsync, real_replace = torch.save, os.fsync, os.replace
    real_unlink, real_atomic_save = Path.unlink, checkpoint_module.atomic_save

    def save(obj, handle, *args, **kwargs):
        if not (isinstance(obj, dict) and "model_state_dict" in obj):
            return real_save(obj, handle, *args, **kwargs)
        if not faults.event("write"):
            return real_save(obj, handle, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        handle.write(data[: int(len(data) * faults.spec["kill"].get("fraction", 0.5))])
        handle.flush()
        faults.fire()
        return handle.write(data[handle.tell():])

    def fsync(descriptor):
        if faults.event("fsync"):
            faults.fire()
        return real_fsync(descriptor)

    def replace(source, destination, *args, **kwargs):
        if faults.event("replace"):
            faults.fire()
        result = real_replace(source, destination, *args, **kwargs)
        if faults.event("replaced"):
            faults.fire()
        return result

    def unlink(self, *args, **kwargs):
        if self.suffix == ".pth" and faults.event("unlink"):
            faults.fire()
        return real_unlink(self, *args, **kwargs)

    def atomic_save(obj, path):
        faults.saves.append(str(path))
        return real_atomic_save(obj, path)

    torch.save, os.fsync, os.replace, Path.unlink = save, fsync, replace, unlink
    checkpoint_module.atomic_save = atomic_save


def run_training(args: list, spec: dict) -> int:
    """``train.main(args)`` with the faults of ``spec``; returns the exit code."""
    import torch
    torch.set_num_threads(1)
    faults = install_faults(spec)
    from train import main
    code = 0
    try:
        faults.cli = main(args)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001 - the test reads the traceback in the log
        traceback.print_exc()
        code = 1
    faults.finish()
    return code


# ---------------------------------------------------------------- the server

def serve() -> None:
    """Read one JSON request per line, fork a child per run, answer with their exit status."""
    import torch

    import train  # noqa: F401 - imported once here, inherited by every child
    torch.set_num_threads(1)
    print(READY, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps(_run_children(request)), flush=True)


def _run_children(request: dict) -> list:
    pids = {}
    port = _free_port()
    for index, run in enumerate(request["runs"]):
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(run, port)
        pids[pid] = index
    results = [None] * len(pids)
    started = time.monotonic()
    deadline = started + request.get("timeout", 120)
    while pids and time.monotonic() < deadline:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            time.sleep(0.02)
            continue
        results[pids.pop(pid)] = {"exit": os.waitstatus_to_exitcode(status),
                                  "seconds": round(time.monotonic() - started, 2)}
    for pid, index in pids.items():  # still running at the deadline: a hang
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        results[index] = {"exit": None, "timed_out": True}
    return results


def _child(run: dict, port: int) -> None:
    try:
        descriptor = os.open(run["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(descriptor, 1)
        os.dup2(descriptor, 2)
        os.environ.update({key: str(value) for key, value in run.get("env", {}).items()})
        if "WORLD_SIZE" in run.get("env", {}):
            os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        code = run_training(run["args"], run.get("faults", {}))
    except BaseException:  # noqa: BLE001 - never return into the server's loop
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ForkServer:
    """The test side of :func:`serve`."""

    def __init__(self, log_file: Path):
        self.log_file = log_file
        self.process = None

    def start(self) -> None:
        code = (f"import sys; sys.path[:0] = [{str(TESTS)!r}, {str(REPO)!r}]\n"
                "from fault_injection import serve; serve()")
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        with open(self.log_file, "w") as errors:
            self.process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=errors, text=True,
                                            env=env, cwd=REPO)
        if self._read_line(300) != READY:
            raise RuntimeError("the fork server did not start:\n" + self.log_file.read_text())

    def run(self, runs: list, timeout: float = 120) -> list:
        """Run ``runs`` (dicts with ``args``, ``log`` and optionally ``env`` and ``faults``) at
        once; returns per run ``{"exit": code}`` (a negative code for a signal) or
        ``{"exit": None, "timed_out": True}`` for a run killed at ``timeout`` seconds."""
        if self.process is None or self.process.poll() is not None:
            self.start()
        self.process.stdin.write(json.dumps({"runs": runs, "timeout": timeout}) + "\n")
        self.process.stdin.flush()
        return json.loads(self._read_line(timeout + 60))

    def _read_line(self, timeout: float) -> str:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            self.close()
            raise TimeoutError("the fork server did not answer")
        return self.process.stdout.readline().strip()

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


_SERVER: ForkServer | None = None


def fork_server(tmp_root: Path) -> ForkServer:
    """The process-wide fork server (started on first use, closed at exit)."""
    global _SERVER
    if _SERVER is None:
        import atexit
        _SERVER = ForkServer(Path(tmp_root) / "fork_server.log")
        _SERVER.start()
        atexit.register(_SERVER.close)
    return _SERVER


def ddp_env(rank: int, world_size: int = 2) -> dict:
    """Environment of rank ``rank`` started from outside, as torchrun starts it."""
    return {"WORLD_SIZE": world_size, "RANK": rank, "LOCAL_RANK": rank, "NODE_RANK": 0,
            "LOCAL_WORLD_SIZE": world_size}
