"""Read market data files into a :class:`MarketPanel`: one (days, nodes) matrix per bar field.

Two layouts are accepted:

* a long table (``.csv``, ``.csv.gz`` or ``.parquet``), one row per (date, node), with columns
  ``date``, ``node`` and bar fields (``close`` required; ``open``, ``high``, ``low``,
  ``volume``, ``amount`` used when present);
* a folder of wide matrices, one file per field (``close.csv.gz``, ``open.parquet``, ...),
  rows = dates (first column ``date``), columns = nodes.

Every check on the content raises :class:`DataFormatError` naming the file, the column and the
first offending row, so the user can fix the file rather than guess.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

PRICE_FIELDS = ("open", "high", "low", "close")
BAR_FIELDS = ("open", "high", "low", "close", "volume", "amount")
TABLE_SUFFIXES = (".csv", ".csv.gz", ".parquet")
EMBEDDED_DATA_DIR = Path(__file__).parent / "data" / "sp500_20"


class DataFormatError(ValueError):
    """A data file cannot be used as it is; the message says where and what to change."""


@dataclass
class MarketPanel:
    """Daily bars of a universe of nodes, aligned on one calendar.

    Attributes:
        dates: trading days, increasing.  # (days,)
        nodes: node names (tickers or industry codes).  # (nodes,)
        fields: bar field name -> float64 matrix, NaN where a node had no bar.  # (days, nodes)
        source: the file or folder the panel was read from, for messages.
    """

    dates: pd.DatetimeIndex
    nodes: list
    fields: dict
    source: str

    @property
    def num_days(self) -> int:
        return len(self.dates)

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)


def load_panel(path) -> MarketPanel:
    """Read a long table file or a folder of wide matrices.

    Args:
        path: a ``.csv``/``.csv.gz``/``.parquet`` long table, or a folder holding one wide file
            per field. ``None`` or ``"embedded"`` reads the data shipped with the project.

    Raises:
        DataFormatError: the path does not exist or a file breaks the format.
    """
    if path is None or str(path) == "embedded":
        path = EMBEDDED_DATA_DIR
    path = Path(path)

    if path.is_dir():
        panel = _read_wide_folder(path)
    elif path.is_file():
        panel = _read_long_table(path)
    else:
        raise DataFormatError(
            f"Data path '{path}' does not exist. Pass a long table file "
            f"({', '.join(TABLE_SUFFIXES)}) or a folder of wide matrices such as close.csv.gz."
        )

    _mask_non_finite(panel)
    return panel


def _read_table(path: Path) -> pd.DataFrame:
    name = path.name.lower()
    if not (name.endswith(".parquet") or name.endswith(".csv") or name.endswith(".csv.gz")):
        raise DataFormatError(
            f"File '{path}' has an unknown type; use one of {', '.join(TABLE_SUFFIXES)}."
        )
    try:
        return pd.read_parquet(path) if name.endswith(".parquet") else pd.read_csv(path)
    except (EOFError, OSError, ValueError) as error:
        # Truncated archives (EOFError, zlib's error), empty files (EmptyDataError, a
        # ValueError) and broken Parquet (OSError, ArrowInvalid) say nothing of the file.
        raise DataFormatError(
            f"{path} cannot be read ({type(error).__name__}: {error}). The file looks empty, "
            f"truncated or not a {'Parquet' if name.endswith('.parquet') else 'CSV'} file; "
            f"write it again."
        ) from error


def _line(path: Path, row: int) -> str:
    """Human position of a data row: CSV files count the header as line 1."""
    if path.name.lower().endswith(".parquet"):
        return f"row {row}"
    return f"row {row} (line {row + 2})"


def _find_column(frame: pd.DataFrame, name: str):
    """The column called ``name`` in any letter case, or None."""
    for column in frame.columns:
        if str(column).strip().lower() == name:
            return column
    return None


def _parse_dates(values: pd.Series, path: Path, column: str) -> pd.DatetimeIndex:
    parsed = pd.to_datetime(values, errors="coerce", format="mixed")
    bad = np.flatnonzero(parsed.isna().to_numpy())
    if len(bad):
        row = int(bad[0])
        raise DataFormatError(
            f"{path}: column '{column}' has a value that is not a date at {_line(path, row)}: "
            f"{values.iloc[row]!r}. Write dates as YYYY-MM-DD."
        )
    return pd.DatetimeIndex(parsed)


def _to_numbers(values: pd.Series, path: Path, column: str, row_offset: int = 0) -> np.ndarray:
    numbers = pd.to_numeric(values, errors="coerce")
    bad = np.flatnonzero(numbers.isna().to_numpy() & values.notna().to_numpy())
    if len(bad):
        row = int(bad[0])
        raise DataFormatError(
            f"{path}: column '{column}' has a value that is not a number at "
            f"{_line(path, row + row_offset)}: {values.iloc[row]!r}. Leave the cell empty "
            f"for a missing bar."
        )
    return numbers.to_numpy(dtype=np.float64)


def _check_positive(values: np.ndarray, path: Path, column: str, what: str) -> None:
    """Prices must be > 0 (volume >= 0); NaN is a missing bar and allowed."""
    with np.errstate(invalid="ignore"):
        bad = values < 0 if what == "volume" else values <= 0
    bad_rows = np.flatnonzero(bad)
    if len(bad_rows):
        row = int(bad_rows[0])
        rule = "negative" if what == "volume" else "zero or negative"
        raise DataFormatError(
            f"{path}: column '{column}' has a {rule} {what} at {_line(path, row)}: "
            f"{float(values[row])}. Leave the cell empty for a missing bar, or fix the value."
        )


def _read_long_table(path: Path) -> MarketPanel:
    table = _read_table(path)

    found = {name: _find_column(table, name) for name in ("date", "node", "close")}
    missing = [name for name, column in found.items() if column is None]
    if missing:
        raise DataFormatError(
            f"{path}: missing column(s) {missing}. A long table needs 'date', 'node' and "
            f"'close' (found: {list(map(str, table.columns))})."
        )

    dates = _parse_dates(table[found["date"]], path, str(found["date"]))
    nodes = table[found["node"]].astype(str).str.strip()
    keys = pd.DataFrame({"date": dates, "node": nodes.to_numpy()})
    duplicated = np.flatnonzero(keys.duplicated().to_numpy())
    if len(duplicated):
        row = int(duplicated[0])
        raise DataFormatError(
            f"{path}: duplicate (date, node) at {_line(path, row)}: "
            f"({keys['date'].iloc[row].date()}, {keys['node'].iloc[row]}) appears twice. "
            f"Keep one row per node and day."
        )

    fields = {}
    for field in BAR_FIELDS:
        column = _find_column(table, field)
        if column is None:
            continue
        values = _to_numbers(table[column], path, str(column))
        _check_positive(values, path, str(column), "volume" if field in ("volume", "amount")
                        else "price")
        fields[field] = values

    all_dates = pd.DatetimeIndex(sorted(set(dates)))
    all_nodes = sorted(set(keys["node"]))
    day_index = all_dates.get_indexer(dates)
    node_index = pd.Index(all_nodes).get_indexer(keys["node"])
    matrices = {}
    for field, values in fields.items():
        matrix = np.full((len(all_dates), len(all_nodes)), np.nan)  # (days, nodes)
        matrix[day_index, node_index] = values
        matrices[field] = matrix
    return MarketPanel(all_dates, all_nodes, matrices, str(path))


def _field_files(folder: Path) -> dict:
    files = {}
    for candidate in sorted(folder.iterdir()):
        name = candidate.name.lower()
        for suffix in TABLE_SUFFIXES:
            if name.endswith(suffix) and name[: -len(suffix)] in BAR_FIELDS:
                files[name[: -len(suffix)]] = candidate
    return files


def _read_wide_file(path: Path):
    table = _read_table(path)
    date_column = _find_column(table, "date")
    if date_column is None:
        raise DataFormatError(
            f"{path}: missing column 'date'. A wide matrix needs a first column 'date' and "
            f"one column per node (found: {list(map(str, table.columns[:5]))} ...)."
        )
    dates = _parse_dates(table[date_column], path, str(date_column))
    duplicated = np.flatnonzero(dates.duplicated())
    if len(duplicated):
        row = int(duplicated[0])
        raise DataFormatError(
            f"{path}: date {dates[row].date()} appears twice ({_line(path, row)}). "
            f"Keep one row per day."
        )
    nodes = [str(column).strip() for column in table.columns if column != date_column]
    matrix = np.empty((len(dates), len(nodes)))  # (days, nodes)
    for position, column in enumerate(c for c in table.columns if c != date_column):
        matrix[:, position] = _to_numbers(table[column], path, str(column))
    return dates, nodes, matrix


def _read_wide_folder(folder: Path) -> MarketPanel:
    files = _field_files(folder)
    if "close" not in files:
        raise DataFormatError(
            f"Folder '{folder}' has no close file. A wide-matrix folder needs close.csv, "
            f"close.csv.gz or close.parquet (and optionally open, high, low, volume, amount)."
        )

    dates, nodes, close = _read_wide_file(files["close"])
    fields = {"close": close}
    for field, path in files.items():
        if field == "close":
            continue
        field_dates, field_nodes, matrix = _read_wide_file(path)
        if field_nodes != nodes or not field_dates.equals(dates):
            raise DataFormatError(
                f"{path}: its dates or node columns differ from {files['close'].name}. "
                f"All field files of a folder must share the same rows and columns."
            )
        fields[field] = matrix

    order = np.argsort(dates.values, kind="stable")
    dates = dates[order]
    for field, matrix in fields.items():
        matrix = matrix[order]
        fields[field] = matrix
        kind = "volume" if field in ("volume", "amount") else "price"
        with np.errstate(invalid="ignore"):
            bad = (matrix < 0) if kind == "volume" else (matrix <= 0)
        if bad.any():
            row, col = map(int, np.argwhere(bad)[0])
            rule = "negative" if kind == "volume" else "zero or negative"
            raise DataFormatError(
                f"{files[field]}: column '{nodes[col]}' has a {rule} {kind} on "
                f"{dates[row].date()}: {float(matrix[row, col])}. Leave the cell empty for a "
                f"missing bar, or fix the value."
            )
    return MarketPanel(dates, nodes, fields, str(folder))


def _mask_non_finite(panel: MarketPanel) -> None:
    """Turn inf into NaN (a missing bar) and report how many bars were masked, in one line."""
    counts = {}
    for field, matrix in panel.fields.items():
        infinite = np.isinf(matrix)
        if infinite.any():
            matrix[infinite] = np.nan
        counts[field] = int(np.isnan(matrix).sum())
    total = panel.num_days * panel.num_nodes
    log.info(
        "Loaded %s: %d days x %d nodes, fields %s; missing or non-finite bars masked: %s "
        "(of %d cells per field)",
        panel.source, panel.num_days, panel.num_nodes, list(panel.fields), counts, total,
    )


def load_groups(path, nodes: list, node_column=None, group_column=None) -> np.ndarray:
    """Read a group map (node -> sector or industry) aligned to ``nodes``.

    Args:
        path: CSV file with a node column and a group column.
        nodes: the panel's node names; the result follows their order.
        node_column: name of the node column; default: the first of node, ticker, symbol.
        group_column: name of the group column; default: the first of group, sector, industry.

    Returns:
        Object array of group labels, ``None`` for nodes without a group (absent from the map,
        empty, or ``n/a``).  # (nodes,)

    Raises:
        DataFormatError: a column is missing, a node is listed twice, or the map names a node
            the price data does not have.
    """
    path = Path(path)
    table = pd.read_csv(path, keep_default_na=False, dtype=str)
    tried = {"node": ("node", "ticker", "symbol"), "group": ("group", "sector", "industry")}
    node_column = node_column or _first_present(table, tried["node"])
    group_column = group_column or _first_present(table, tried["group"])
    for role, column in (("node", node_column), ("group", group_column)):
        if column is None or column not in table.columns:
            looked_for = repr(column) if column is not None else " or ".join(tried[role])
            raise DataFormatError(
                f"{path}: no {role} column {looked_for} (found: {list(table.columns)}). Set "
                f"data.group_{role}_column to the right name."
            )

    names = table[node_column].str.strip()
    known = set(nodes)
    for row, name in enumerate(names):
        if name not in known:
            raise DataFormatError(
                f"{path}: column '{node_column}' names node {name!r} at {_line(path, row)}, "
                f"which the price data does not have. Remove the row or add the node's bars."
            )
    duplicated = np.flatnonzero(names.duplicated().to_numpy())
    if len(duplicated):
        row = int(duplicated[0])
        raise DataFormatError(
            f"{path}: node {names.iloc[row]!r} is listed twice ({_line(path, row)}). "
            f"Give each node one group."
        )

    group_of = dict(zip(names, table[group_column].str.strip()))
    groups = np.array([group_of.get(node) for node in nodes], dtype=object)
    no_group = np.array([g is None or g == "" or g.lower() == "n/a" for g in groups])
    groups[no_group] = None
    if no_group.any():
        log.info("%d of %d nodes have no group in %s and get no edges",
                 int(no_group.sum()), len(nodes), path)
    return groups


def _first_present(table: pd.DataFrame, names):
    for name in names:
        column = _find_column(table, name)
        if column is not None:
            return column
    return None


def load_adjacency(path, nodes: list) -> np.ndarray:
    """Read a square adjacency matrix CSV (first column and header = node names).

    Returns:
        Boolean matrix in the order of ``nodes``; a non-zero cell is an edge.  # (nodes, nodes)
    """
    path = Path(path)
    table = pd.read_csv(path, index_col=0)
    rows = [str(name).strip() for name in table.index]
    columns = [str(name).strip() for name in table.columns]
    if sorted(rows) != sorted(columns):
        raise DataFormatError(
            f"{path}: the row names (first column) and the header must list the same nodes."
        )
    unknown = [name for name in rows if name not in set(nodes)]
    if unknown:
        row = rows.index(unknown[0])
        raise DataFormatError(
            f"{path}: row {row} names node {unknown[0]!r}, which the price data does not "
            f"have. Remove it or add the node's bars."
        )
    values = table.to_numpy(dtype=np.float64)
    order_rows = pd.Index(rows).get_indexer(nodes)
    order_columns = pd.Index(columns).get_indexer(nodes)
    adjacency = np.zeros((len(nodes), len(nodes)), dtype=bool)  # (nodes, nodes)
    present = order_rows >= 0
    adjacency[np.ix_(present, present)] = (
        values[np.ix_(order_rows[present], order_columns[present])] != 0
    )
    return adjacency
