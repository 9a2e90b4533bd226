"""Checkpoint tools and the preflight checklist as commands.

Usage::

    python ckpt.py list checkpoints/
    python ckpt.py show checkpoints/best_model.pth
    python ckpt.py plot checkpoints/ --out curves.png
    python ckpt.py backup checkpoints/best_model.pth --name before_tuning
    python ckpt.py prune checkpoints/ --keep 5
    python ckpt.py verify checkpoints/
    python ckpt.py doctor --config configs/default_config.yaml --data.batch_size=8 --strict

Every file is read with ``torch.load(..., weights_only=True)``: a damaged or hostile file is
reported as damaged, never executed. Exit status: 0 fine, 1 a damaged file or a failed check,
2 a usage error.
"""

import argparse
import filecmp
import logging
import sys
import time
import warnings
from pathlib import Path

from callbacks.checkpoint_files import backup_file, classify, files_to_prune
from callbacks.checkpoint_io import atomic_copy
from callbacks.checkpoint_summary import (
    best_epoch,
    checkpoint_paths,
    format_number,
    format_percent,
    format_size,
    progress_lines,
    summarize,
    summarize_folder,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
BEST_MARK = "★"
LIST_COLUMNS = ("file", "kind", "epoch", "train loss", "val loss", "val acc", "IC", "RankIC",
                "best", "size", "status")


def main(argv=None) -> int:
    """Run one command; ``argv`` replaces ``sys.argv[1:]``. Returns the exit status."""
    parser = _parser()
    args, overrides = parser.parse_known_args(argv)
    if overrides and args.command != "doctor":
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args, overrides)
    except _UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE


def list_command(args, overrides) -> int:
    """One row per checkpoint file of a folder."""
    summaries = summarize_folder(_folder(args.dir))
    if not summaries:
        print(f"No checkpoint files in {args.dir}")
        return EXIT_OK
    best = best_epoch(summaries)
    rows = []
    for summary in summaries:
        metrics = summary.metrics
        is_best = summary.ok and (summary.kind == "best" or (
            summary.kind == "epoch" and best is not None and summary.epoch == best))
        rows.append((
            summary.path.name, summary.kind or "?", _text(summary.epoch),
            format_number(metrics.get("train_loss"), ".4f"),
            format_number(metrics.get("val_loss"), ".4f"),
            format_percent(metrics.get("val_accuracy")),
            format_number(metrics.get("val_IC"), "+.4f"),
            format_number(metrics.get("val_RankIC"), "+.4f"),
            BEST_MARK if is_best else "", format_size(summary.size), summary.status,
        ))
    print("\n".join(_table(LIST_COLUMNS, rows)))
    damaged = [summary for summary in summaries if not summary.ok]
    for summary in damaged:
        print(f"damaged: {summary.path.name}: {summary.problem}")
    return EXIT_FAILED if damaged else EXIT_OK


def show_command(args, overrides) -> int:
    """The progress print of one file, with its error or warning information."""
    path = Path(args.file)
    if not path.is_file():
        raise _UsageError(f"{path} is not a file")
    summary = summarize(path)
    print("\n".join(progress_lines(summary)))
    return EXIT_OK if summary.ok else EXIT_FAILED


def plot_command(args, overrides) -> int:
    """Training curves of a folder or one file, in one PNG."""
    from callbacks.plots import CURVES_FILE, curves_from_summaries, plot_curves

    path = Path(args.path)
    if path.is_dir():
        summaries, folder = summarize_folder(path), path
    elif path.is_file():
        summaries, folder = [summarize(path)], path.parent
    else:
        raise _UsageError(f"{path} is neither a folder nor a file")
    curves = curves_from_summaries(summaries, source=str(path))
    if curves.empty:
        print(f"Nothing to plot: no readable checkpoint with metrics in {path}", file=sys.stderr)
        return EXIT_FAILED
    out = plot_curves(curves, Path(args.out) if args.out else folder / CURVES_FILE)
    print(f"Wrote {out}")
    return EXIT_OK


def backup_command(args, overrides) -> int:
    """Crash-safe copy of a checkpoint to ``backup_<name>.pth`` in its folder."""
    source = Path(args.file)
    if not source.is_file():
        raise _UsageError(f"{source} is not a file")
    summary = summarize(source)
    if not summary.ok:
        print(f"Not backed up: {source} is damaged ({summary.problem})", file=sys.stderr)
        return EXIT_FAILED
    name = args.name or _default_backup_name(source, summary.epoch)
    try:
        target = source.parent / backup_file(name)
    except ValueError as error:
        raise _UsageError(str(error)) from None
    if target.exists() and not args.force:
        if filecmp.cmp(source, target, shallow=False):
            print(f"Already backed up: {target}")
            return EXIT_OK
        print(f"Not backed up: {target} exists and differs; pass --force to replace it or "
              f"--name for another name", file=sys.stderr)
        return EXIT_FAILED
    size = atomic_copy(source, target)
    if not filecmp.cmp(source, target, shallow=False):
        print(f"Backup {target} differs from {source} after copying", file=sys.stderr)
        return EXIT_FAILED
    print(f"Backed up {source} -> {target} ({format_size(size)}); backups are never pruned")
    return EXIT_OK


def prune_command(args, overrides) -> int:
    """Delete all but the ``--keep`` newest epoch files; other kinds are never touched."""
    folder = _folder(args.dir)
    if args.keep < 1:
        raise _UsageError(f"--keep must be >= 1, got {args.keep}")
    # Only regular files that load count as kept: a damaged newest file (or a folder or link
    # under an epoch name) must never push the good checkpoints out. Those are left alone.
    candidates, skipped = [], []
    for path in sorted(folder.iterdir()):
        if classify(path)[0] != "epoch":
            continue
        loads = path.is_file() and not path.is_symlink() and summarize(path).ok
        (candidates if loads else skipped).append(path)
    for path in skipped:
        print(f"Left alone (not a loadable checkpoint): {path}")
    doomed = files_to_prune(candidates, args.keep)
    verb = "Would delete" if args.dry_run else "Deleted"
    for path in doomed:
        if not args.dry_run:
            path.unlink(missing_ok=True)
        print(f"{verb} {path}")
    kept = "keeps" if args.dry_run else "kept"
    print(f"{verb} {len(doomed)} file(s); {kept} the {args.keep} newest epoch files. Best, "
          f"error, NaN and backup files are never pruned.")
    return EXIT_OK


def verify_command(args, overrides) -> int:
    """Load every checkpoint file with ``weights_only=True``; exit 1 when any is damaged."""
    path = Path(args.path)
    if path.is_dir():
        paths = checkpoint_paths(path)
    elif path.is_file():
        paths = [path]
    else:
        raise _UsageError(f"{path} is neither a folder nor a file")
    if not paths:
        print(f"No checkpoint files in {path}")
        return EXIT_FAILED
    damaged = 0
    for file in paths:
        summary = summarize(file)
        damaged += not summary.ok
        mark = "✔" if summary.ok else "✘"
        detail = "ok" if summary.ok else f"damaged: {summary.problem}"
        print(f"{mark} {file.name:<32} {format_size(summary.size):>9}  {detail}")
    print(f"{len(paths) - damaged} ok, {damaged} damaged")
    return EXIT_FAILED if damaged else EXIT_OK


def doctor_command(args, overrides) -> int:
    """Build the run of ``train.py fit`` from the config without training and run the checks."""
    from callbacks.preflight import run_checks

    if not args.verbose:
        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
    cli_args = [item for config in args.config for item in ("--config", config)] + overrides
    started = time.perf_counter()
    cli = _build_cli(cli_args)
    print(f"Config, model and data of {' '.join(cli_args) or 'the defaults'} built in "
          f"{time.perf_counter() - started:.1f} s")
    training = cli._get(cli.config_init, "training")
    device = cli.trainer.strategy.root_device
    if args.dry_run or training.preflight_dry_run:
        cli.model.to(device)
    checklist = run_checks(cli.model, cli.datamodule, cli.trainer, training.save_dir,
                           training.keep_last, training.min_free_disk_gb,
                           dry_run=args.dry_run or training.preflight_dry_run)
    print("\n".join(checklist.lines()))
    if checklist.passed(strict=args.strict):
        return EXIT_OK
    print("Failed" + (" (--strict: warnings count as failures)" if args.strict else ""),
          file=sys.stderr)
    return EXIT_FAILED


def _build_cli(cli_args: list):
    # The same parser, links and callbacks as train.py, instantiated without running fit.
    from datamodules.market_datamodule import MarketDataModule
    from lit_models.lit_gated_gnn import GatedGNNModule
    from train import GatedGNNCLI

    with warnings.catch_warnings():
        # LightningCLI warns when sys.argv (this command's) and args are both present.
        warnings.filterwarnings("ignore", message=".*args parameter is intended.*")
        return GatedGNNCLI(GatedGNNModule, MarketDataModule, args=cli_args, run=False,
                           save_config_kwargs={"overwrite": True})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckpt.py", description="Inspect, plot, back up, prune and verify checkpoint files; "
        "run the preflight checklist.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    command = commands.add_parser("list", help="one row per checkpoint file of a folder")
    command.add_argument("dir", help="checkpoint folder (training.save_dir)")
    command.set_defaults(run=list_command)

    command = commands.add_parser("show", help="progress and error/warning info of one file")
    command.add_argument("file")
    command.set_defaults(run=show_command)

    command = commands.add_parser("plot", help="loss, accuracy, IC, lr and gate curves (PNG)")
    command.add_argument("path", help="checkpoint folder or one checkpoint file")
    command.add_argument("--out", help="PNG to write (default: curves.png in the folder)")
    command.set_defaults(run=plot_command)

    command = commands.add_parser("backup", help="crash-safe copy to backup_<name>.pth")
    command.add_argument("file")
    command.add_argument("--name", help="backup name (default: the file's name and epoch)")
    command.add_argument("--force", action="store_true", help="replace an existing backup")
    command.set_defaults(run=backup_command)

    command = commands.add_parser("prune", help="keep only the newest epoch files")
    command.add_argument("dir")
    command.add_argument("--keep", type=int, default=5, help="epoch files to keep (default 5)")
    command.add_argument("--dry-run", action="store_true", help="only say what would go")
    command.set_defaults(run=prune_command)

    command = commands.add_parser("verify", help="load every file safely; exit 1 if damaged")
    command.add_argument("path", help="checkpoint folder or one file")
    command.set_defaults(run=verify_command)

    command = commands.add_parser(
        "doctor", help="preflight checklist of a config (further --section.key=value "
        "arguments override it, as with train.py)")
    command.add_argument("--config", action="append", default=[], help="config file(s)")
    command.add_argument("--strict", action="store_true", help="a ⚠ fails as a ✘ does")
    command.add_argument("--dry-run", action="store_true",
                         help="also run one training batch forward and backward")
    command.add_argument("--verbose", action="store_true", help="keep Lightning's messages")
    command.set_defaults(run=doctor_command)
    return parser


class _UsageError(Exception):
    pass


def _folder(value) -> Path:
    folder = Path(value)
    if not folder.is_dir():
        raise _UsageError(f"{folder} is not a folder")
    return folder


def _default_backup_name(source: Path, epoch) -> str:
    # best_model.pth -> best_model_epoch4; epoch_5.pth keeps its own number.
    if epoch is not None and classify(source)[1] is None:
        return f"{source.stem}_epoch{epoch}"
    return source.stem


def _text(value) -> str:
    return "-" if value is None else str(value)


def _table(headers: tuple, rows: list) -> list:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = ["  ".join(f"{cell:<{width}}" for cell, width in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(f"{cell:<{width}}" for cell, width in zip(row, widths)).rstrip()
              for row in rows]
    return lines


if __name__ == "__main__":
    sys.exit(main())
