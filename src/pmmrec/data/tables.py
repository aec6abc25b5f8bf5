"""Reading the input tables of ``pmmrec data prepare``: an interaction log and an item metadata table.

A table is CSV, TSV or Parquet (CSV and TSV optionally ``.gz``) with a header line naming its columns. A column
is found by its exact name, then case-insensitively, then, when left at its default name, by the aliases in
``_ALIASES`` (MovieLens' ``movie_id`` for ``item``). The field separator of a CSV/TSV file is given or sniffed
from the header. Every row is validated as it is read, and every error is a :class:`~pmmrec.errors.DataError`
naming the file, the line (for Parquet, the 1-based row) and the column where one is at fault: missing columns,
wrong field counts, malformed quoting, invalid UTF-8, empty or whitespace-holding ids, duplicate item ids and
timestamps that are neither finite numbers nor ISO-8601 dates.

Timestamps: numeric epochs (seconds or milliseconds), or ISO-8601 dates and datetimes (``2018-09-20``,
``2018-09-20T14:03:00``, with or without a time zone; naive ones are read as UTC). Only their order matters, so a
column of one kind is used as it is; in a column that mixes ISO dates and numbers, the numbers are converted to
seconds first, their unit given by ``time_unit`` or detected (``auto``: milliseconds when a value is at least
1e11, i.e. past the year 5000 in seconds).

:func:`read_items` and :func:`read_interactions` return the two tables parsed (ids, titles, per-row codes);
filtering, splitting into domains and writing are :mod:`pmmrec.data.prepare`'s.
"""

from __future__ import annotations

import csv
import gzip
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pmmrec.errors import DataError

_TEXT_SEPARATORS = ("\t", ",", ";", "|")  # candidates when sniffing a header line
# Accepted spellings of a column left at its default name (matched case-insensitively), e.g. MovieLens' movie_id.
_ALIASES = {
    "user": ("user_id", "userid", "uid", "user"),
    "item": ("item_id", "itemid", "movie_id", "movieid", "iid", "item"),
    "timestamp": ("time", "ts", "unix_time", "timestamp"),
    "title": ("name", "item_title", "title"),
    "image_path": ("image", "image_file", "poster", "image_path"),
}


@dataclass(frozen=True)
class PrepareColumns:
    """How to read the input tables. A column left at its default name also matches the aliases in ``_ALIASES``."""

    user: str = "user"
    item: str = "item"  # the item column of the interactions (and of the metadata, unless meta_item is set)
    meta_item: str | None = None  # the item column of the metadata, when it is named differently
    time: str | None = "timestamp"  # None (or ""): the file order is chronological
    title: str = "title"
    image: str | None = "image_path"  # optional per-item image file, found in the image folder by its stem
    sep: str = "auto"  # field separator of CSV/TSV files; "auto": tab for .tsv, else sniffed from the header
    list_sep: str = "|"  # separator inside a list-valued column (MovieLens genres: Action|Comedy)
    time_unit: str = "auto"  # numeric timestamps: "s", "ms" or "auto" (see the module docstring)



def _resolve(path: Path, header: list[str], name: str | None, default: str | None, required: bool) -> int | None:
    """Index of column ``name`` in ``header``: exact, then case-insensitive, then (default names only) aliases."""
    if not name:
        return None
    if name in header:
        return header.index(name)
    lowered = [h.strip().lower() for h in header]
    candidates = [name] + list(_ALIASES.get(name, ())) if name == default else [name]
    for candidate in candidates:
        if candidate.lower() in lowered:
            return lowered.index(candidate.lower())
    if not required:
        return None
    raise DataError(f"missing column {name!r}; the columns found are {header}", path, 1, name)


def _sniff_separator(path: Path, first_line: str, sep: str) -> str:
    if sep != "auto":
        return {"\\t": "\t", "tab": "\t"}.get(sep, sep)
    if _base_suffix(path) in (".tsv", ".tab"):
        return "\t"
    counts = [first_line.count(s) for s in _TEXT_SEPARATORS]
    return _TEXT_SEPARATORS[int(np.argmax(counts))] if max(counts) else ","


def _base_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _open_text(path: Path):
    # utf-8-sig drops the byte-order mark some spreadsheet tools write; newline="" is what the csv module expects.
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _utf8_error(path: Path) -> DataError:
    """Locate the first invalid UTF-8 line (the streaming decoder cannot say which line it was on)."""
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return DataError(f"invalid UTF-8 at byte {e.start} of the line", path, number)
    return DataError("invalid UTF-8", path)


def _iter_table(path: Path, wanted: list[tuple[str | None, str | None, bool]], sep: str
                ) -> tuple[list[str | None], Iterator[tuple[int, list]]]:
    """Open a table and yield ``(line, [value per wanted column])``; absent optional columns give ``None``.

    ``wanted`` holds ``(name, default name, required)``. Returns the column names actually matched and the row
    iterator. For Parquet, "line" is the 1-based row number.
    """
    if not path.is_file():
        raise DataError("file not found", path)
    if _base_suffix(path) in (".parquet", ".pq"):
        return _iter_parquet(path, wanted)
    f = _open_text(path)
    try:
        first = f.readline()
    except UnicodeDecodeError:
        f.close()
        raise _utf8_error(path) from None
    delimiter = _sniff_separator(path, first, sep)
    f.seek(0)
    # TSV has no quoting (fields cannot hold tabs), so a title that starts with a quote is read literally.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(f, delimiter=delimiter, quoting=quoting, strict=quoting != csv.QUOTE_NONE)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        f.close()
        raise DataError("empty file (a header line naming the columns is required)", path, 1) from None
    except (csv.Error, UnicodeDecodeError):
        f.close()
        raise _utf8_error(path) from None
    indices = [_resolve(path, header, name, default, required) for name, default, required in wanted]
    names = [header[i] if i is not None else None for i in indices]

    def rows() -> Iterator[tuple[int, list]]:
        width = len(header)
        end = reader.line_num  # last line of the previous record: a record (quoted newlines) may span lines
        try:
            for row in reader:
                start, end = end + 1, reader.line_num
                if len(row) != width:
                    if not row or (len(row) == 1 and not row[0].strip()):
                        continue  # blank line
                    raise DataError(f"expected {width} fields (as in the header), got {len(row)}", path, start)
                yield start, [row[i] if i is not None else None for i in indices]
        except UnicodeDecodeError:
            raise _utf8_error(path) from None
        except csv.Error as e:
            raise DataError(f"malformed CSV: {e}", path, end + 1) from None
        finally:
            f.close()

    return names, rows()


def _iter_parquet(path: Path, wanted: list[tuple[str | None, str | None, bool]]
                  ) -> tuple[list[str | None], Iterator[tuple[int, list]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read Parquet: {e}", path) from None
    header = list(table.column_names)
    indices = [_resolve(path, header, name, default, required) for name, default, required in wanted]
    names = [header[i] if i is not None else None for i in indices]
    columns = []
    for i in indices:
        if i is None:
            columns.append([None] * table.num_rows)
            continue
        column = table.column(i)
        if pa.types.is_timestamp(column.type):
            column = column.cast(pa.int64())  # in the column's own unit: only the order matters
        columns.append(column.to_pylist())

    def rows() -> Iterator[tuple[int, list]]:
        for n, values in enumerate(zip(*columns, strict=True), start=1):
            yield n, ["" if v is None else v for v in values]

    return names, rows()


def _check_id(value, path: Path, line: int, column: str) -> str:
    text = value.strip() if isinstance(value, str) else str(value)
    if not text:
        raise DataError("empty id", path, line, column)
    if text.split() != [text]:
        raise DataError(f"id {text!r} contains whitespace (ids are written space-separated); "
                        "clean the ids before preparing", path, line, column)
    return text


MS_THRESHOLD = 1e11  # auto: a numeric timestamp this large is in milliseconds (in seconds: past the year 5000)


def _parse_time(value, path: Path, line: int, column: str) -> tuple[int | float, bool]:
    """``(time, is_iso)``: a number as it is, or an ISO-8601 date/datetime as seconds since the epoch."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        t = value
    else:
        text = value.strip()
        if not text:
            raise DataError("empty timestamp", path, line, column)
        try:
            return int(text), False
        except ValueError:
            try:
                t = float(text)
            except ValueError:
                return _parse_iso(text, path, line, column), True
    if not math.isfinite(t):
        raise DataError(f"timestamp {value!r} is not finite", path, line, column)
    return t, False


def _parse_iso(text: str, path: Path, line: int, column: str) -> float:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise DataError(f"timestamp {text[:40]!r} is neither a number (unix seconds or milliseconds) nor an ISO-8601 "
                        "date or datetime (e.g. 2018-09-20 or 2018-09-20T14:03:00+02:00)", path, line, column) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _combine_times(times: list, iso: list[bool], unit: str) -> tuple[np.ndarray, str]:
    """The column's times as one ordered array, and how they were read (for the report)."""
    any_iso = any(iso)
    numeric = [t for t, i in zip(times, iso, strict=True) if not i]
    if unit == "auto":
        unit = "ms" if numeric and max(abs(t) for t in numeric) >= MS_THRESHOLD else "s"
    if any_iso and numeric:  # mixed: numbers to seconds, so that they order with the dates
        scale = 1000.0 if unit == "ms" else 1.0
        times = [t if i else t / scale for t, i in zip(times, iso, strict=True)]
    out = np.asarray(times)
    if out.dtype == object:  # an integer beyond int64: order as floats
        out = out.astype(np.float64)
    kind = "iso-8601" if any_iso and not numeric else f"numeric ({unit})" if not any_iso else f"iso-8601 + numeric ({unit})"
    return out, kind


@dataclass
class ItemTable:
    """The item metadata table, in file order."""

    ids: list[str]
    titles: list[str]
    lines: list[int]  # metadata line of each item, for later errors
    images: list[str | None]  # per-item image path, when the metadata names one
    values: list[list[str]] | None  # the split_by column's values per item
    index: dict[str, int]  # id -> position


def read_items(path: Path, columns: PrepareColumns, split_by: str | None) -> tuple[ItemTable, dict]:
    """Read the item metadata; also returns the column names matched (item, title, image, split_by)."""
    d = PrepareColumns()
    explicit_image = columns.image is not None and columns.image != d.image
    wanted = [(columns.meta_item or columns.item, d.item, True), (columns.title, d.title, True),
              (columns.image, d.image, explicit_image), (split_by, None, True)]
    names, rows = _iter_table(path, wanted, columns.sep)
    item_col, title_col = names[0], names[1]
    items = ItemTable([], [], [], [], [] if split_by else None, {})
    for line, (item, title, image, values) in rows:
        item_id = _check_id(item, path, line, item_col)
        if item_id in items.index:
            first = items.lines[items.index[item_id]]
            raise DataError(f"duplicate item id {item_id!r} (first on line {first})", path, line, item_col)
        items.index[item_id] = len(items.ids)
        items.ids.append(item_id)
        items.titles.append(" ".join(str(title).split()))
        items.lines.append(line)
        items.images.append((str(image).strip() or None) if image is not None else None)
        if items.values is not None:
            if isinstance(values, str):
                values = values.split(columns.list_sep)
            items.values.append([str(v).strip() for v in values or () if str(v).strip()])
    if not items.ids:
        raise DataError("no items", path)
    return items, {"item": item_col, "title": title_col, "image": names[2], "split_by": names[3]}


@dataclass
class InteractionLog:
    """The interaction table, one entry per row in file order."""

    users: list[str]  # user id per user code (first-appearance order)
    user: np.ndarray  # per row: user code
    item: np.ndarray  # per row: item position in the metadata (-1: unknown)
    time: np.ndarray  # per row: timestamp (or file position when there is no time column)
    unknown: dict[str, int]  # item id not in the metadata -> first line naming it


def read_interactions(path: Path, columns: PrepareColumns, items: ItemTable) -> tuple[InteractionLog, dict]:
    """Read the interaction log against ``items``; also returns the column names matched (user, item, time)."""
    d = PrepareColumns()
    time_col = columns.time or None
    wanted = [(columns.user, d.user, True), (columns.item, d.item, True), (time_col, d.time, True)]
    names, rows = _iter_table(path, wanted, columns.sep)
    user_col, item_col, t_col = names
    raw_users: dict = {}  # raw cell value -> user code
    user_codes_by_id: dict[str, int] = {}
    user_ids: list[str] = []
    unknown: dict[str, int] = {}  # unknown item id -> first line
    user_codes: list[int] = []
    item_codes: list[int] = []
    times: list = []
    iso: list[bool] = []
    index = items.index
    for line, (user, item, t) in rows:
        code = raw_users.get(user)
        if code is None:
            # Only new raw values are checked: the per-row cost stays one dict lookup.
            uid = _check_id(user, path, line, user_col)
            code = user_codes_by_id.get(uid)
            if code is None:
                code = user_codes_by_id[uid] = len(user_ids)
                user_ids.append(uid)
            raw_users[user] = code
        position = index.get(item)
        if position is None:
            iid = item.strip() if isinstance(item, str) else str(item)
            if not iid:
                raise DataError("empty item id", path, line, item_col)
            position = index.get(iid, -1)
            if position < 0 and iid not in unknown:
                unknown[iid] = line
        user_codes.append(code)
        item_codes.append(position)
        if t_col is not None:
            value, is_iso = _parse_time(t, path, line, t_col)
            times.append(value)
            iso.append(is_iso)
    n = len(user_codes)
    kind = "file order"
    if t_col is None:
        time_arr = np.arange(n, dtype=np.int64)
    else:
        time_arr, kind = _combine_times(times, iso, columns.time_unit)
    if not n:
        raise DataError("no interactions", path)
    log_ = InteractionLog(user_ids, np.asarray(user_codes, dtype=np.int64), np.asarray(item_codes, dtype=np.int64),
                          time_arr, unknown)
    return log_, {"user": user_col, "item": item_col, "time": t_col, "time_format": kind}


