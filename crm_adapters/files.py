"""File-based CRM snapshot: `people`, `accounts` and optional `opportunities` as CSV or Parquet in one directory,
for CRMs without an adapter and for analysts. The column contract is docs/CRM_FILES.md.

Every cell is read as text (CSV: `read_csv` with an explicit all-String schema; Parquet: strings, booleans and
integers are accepted, `created_at` may also be a Date/Datetime column) and validated here. A bad row raises
`CrmFileError` naming the file, the 1-based line (CSV) or row (Parquet), the column, the problem and where needed
the fix -- never a cell value, which may be an email address and the message is stored in the CRM state and by
Prefect. Field limits (ids, addresses, dates) are in docs/CRM_FILES.md; display names are cut by
`base.conform_records` like every adapter's.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import httpx
import polars as pl

from crm_adapters.base import accounts_frame, opportunities_frame, people_frame, website_domain
from o365sync.crm import (
    ACCOUNTS_SCHEMA,
    EARLIEST_CREATED,
    LATEST_CREATED,
    MAX_ADDRESS_CHARS,
    OPPORTUNITIES_SCHEMA,
    CrmError,
    CrmFileError,
    CrmSnapshot,
    connection_settings,
)

if TYPE_CHECKING:
    from o365sync.tenants import TenantConfig

PEOPLE_COLUMNS = ("crm_id", "kind", "email", "account_id", "name", "is_converted")
ACCOUNTS_COLUMNS = ("crm_id", "name", "domain", "website")
OPPORTUNITIES_COLUMNS = ("crm_id", "account_id", "name", "is_closed", "created_at")
KINDS = ("contact", "lead")
TRUE_WORDS = ("true", "1", "yes")
FALSE_WORDS = ("false", "0", "no")
SEPARATOR = ";"  # several addresses / domains in one cell
_ROW = "_row"  # 0-based index of the data record in the file (header excluded)
_NOT = r"\s\x00-\x1f\x7f@<>()\[\],;:\"/\\"
EMAIL_RE = rf"^[^{_NOT}]+@(?:[^{_NOT}.]+\.)+[^{_NOT}.]+$"
MAX_ID_CHARS = 255  # CRM ids are short (Salesforce 18, HubSpot/Pipedrive numbers); a longer one is a broken file
_OUT_OF_RANGE = datetime(1, 1, 2, tzinfo=UTC)  # stands for a parsed date whose year is outside the accepted range
# The csv module (used to map records to lines and to diagnose) stops at 131,072 characters per field by default,
# which is Salesforce's long-text limit: a description column that long must read, not raise. The file's own size
# bounds memory; raising a limit never breaks another reader.
csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
INCREMENTAL = False  # a directory has no change feed: every refresh reads it in full


@dataclass(frozen=True)
class FilesConnection:
    directory: Path  # holds people.(csv|parquet), accounts.(csv|parquet) and optionally opportunities.(csv|parquet)


def connection(tenant: TenantConfig, secrets: dict[str, str]) -> FilesConnection:
    """The tenant's CRM files directory (files need no secrets)."""
    crm = connection_settings(tenant)
    if not crm.directory:
        raise CrmError(f"tenant {tenant.id}: the CRM files directory is not configured")
    return FilesConnection(directory=Path(crm.directory))


def column_name(header: str) -> str:
    """Header cell -> column name: trimmed, lower-case, inner runs of spaces/hyphens as `_` ("Account ID")."""
    return "_".join(header.strip().lower().replace("-", " ").split())


class _Table:
    """One file's known columns as trimmed strings (blank -> null) plus `_row`; blank records removed."""

    def __init__(self, path: Path, frame: pl.DataFrame, records: int, *, header_has_semicolon: bool = False):
        self.path = path
        self.file = path.name
        self.is_csv = path.suffix == ".csv"
        self.frame = frame
        self.records = records  # data records in the file, blank ones included
        self.header_has_semicolon = header_has_semicolon
        self._lines: list[int] | None = None

    def position(self, row: int) -> str:
        """ "line 7" (CSV, 1-based physical line, header = line 1) or "row 7" (Parquet, 1-based)."""
        if not self.is_csv:
            return f"row {row + 1}"
        if self._lines is None:
            self._lines = _record_lines(self.path)
        if len(self._lines) != self.records:
            return f"record {row + 1}"  # records could not be mapped to lines; say so rather than guess
        return f"line {self._lines[row]}"

    def fail(self, row: int, column: str, problem: str) -> NoReturn:
        raise CrmFileError(f"{self.file} {self.position(row)}: {column} {problem}")

    def require(self, *columns: str) -> None:
        for name in columns:
            if name not in self.frame.columns:
                hint = " (columns must be comma-separated)" if self.header_has_semicolon else ""
                raise CrmFileError(f"{self.file}: missing required column {name}{hint}")

    def check_ids(self, *columns: str) -> None:
        for name in columns:
            if name in self.frame.columns:
                self.check(
                    pl.col(name).str.len_chars() > MAX_ID_CHARS,
                    name,
                    f"is longer than {MAX_ID_CHARS} characters (a quote left open?)",
                )

    def col(self, name: str) -> pl.Expr:
        """The column, or nulls when the file does not have it."""
        return pl.col(name) if name in self.frame.columns else pl.lit(None, pl.String).alias(name)

    def first_row(self, mask: pl.Expr) -> int | None:
        hits = self.frame.filter(mask)[_ROW]
        return None if hits.is_empty() else int(hits.min())  # type: ignore[arg-type]

    def check(self, mask: pl.Expr, column: str, problem: str) -> None:
        """Fail on the first row where `mask` holds."""
        row = self.first_row(mask)
        if row is not None:
            self.fail(row, column, problem)


def _record_lines(path: Path) -> list[int]:
    """1-based line on which each data record starts (records may span lines inside quotes)."""
    starts: list[int] = []
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as fh:
        reader = csv.reader(fh)
        next(reader, None)
        before = reader.line_num
        for _ in reader:
            starts.append(before + 1)
            before = reader.line_num
    return starts


def _find(directory: Path, stem: str, *, required: bool) -> Path | None:
    found = [p for p in (directory / f"{stem}.csv", directory / f"{stem}.parquet") if p.is_file()]
    if len(found) == 2:
        raise CrmFileError(f"files CRM: both {stem}.csv and {stem}.parquet exist; keep one")
    if not found:
        if required:
            raise CrmFileError(f"files CRM: no {stem}.csv or {stem}.parquet in the CRM files directory")
        return None
    return found[0]


def _clean(frame: pl.DataFrame, known: Sequence[str], keep_typed: Sequence[str] = ()) -> pl.DataFrame:
    """Trim string cells (blank -> null), drop records whose every cell is blank, keep the known columns."""
    stripped = [
        pl.col(c).str.strip_chars().replace("", None) if frame.schema[c] == pl.String else pl.col(c)
        for c in frame.columns
    ]
    frame = frame.with_columns(stripped).with_row_index(_ROW)
    data = [c for c in frame.columns if c != _ROW]
    blank = pl.all_horizontal([pl.col(c).is_null() for c in data]) if data else pl.lit(True)
    cols = [c for c in known if c in frame.columns]
    return frame.filter(~blank).select(_ROW, *cols)


def _read_csv(path: Path, known: Sequence[str]) -> _Table:
    file = path.name
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:  # a UTF-8 BOM is dropped
            header = next(csv.reader(fh), None)
    except UnicodeDecodeError as exc:  # decoded a buffer ahead: find the line
        _diagnose_csv(path, 0, exc)
    except csv.Error:
        raise CrmFileError(f"{file} line 1: header is not valid CSV") from None
    if not header or not any(h.strip() for h in header):
        raise CrmFileError(f"{file}: empty file or blank header line")
    names = [column_name(h) for h in header]
    for name in known:
        if names.count(name) > 1:
            raise CrmFileError(f"{file} line 1: column {name} appears more than once")
    schema = {f"column_{i}": pl.String for i in range(len(header))}
    try:
        raw = pl.read_csv(path, has_header=False, schema=schema, encoding="utf8", quote_char='"')
    except pl.exceptions.PolarsError as exc:
        _diagnose_csv(path, len(header), exc)
    raw = raw.slice(1)  # the header record
    raw = raw.rename({f"column_{i}": f"{name}\x00{i}" for i, name in enumerate(names)})
    raw = raw.rename({c: c.split("\x00")[0] for c in raw.columns if c.split("\x00")[0] in known})
    return _Table(path, _clean(raw, known), raw.height, header_has_semicolon=SEPARATOR in ",".join(header))


def _diagnose_csv(path: Path, width: int, exc: Exception) -> NoReturn:
    """Turn a Polars read failure into a message with a line number and without file content."""
    file = path.name
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise CrmFileError(f"{file}: UTF-16 text; save it as CSV UTF-8")
    for number, line in enumerate(data.splitlines(), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            raise CrmFileError(f"{file} line {number}: not UTF-8 text; save it as CSV UTF-8") from None
    if b"\r" in data and b"\n" not in data:
        raise CrmFileError(f"{file}: lines end in CR only; save it with LF or CRLF line endings")
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh, strict=True)
            next(reader, None)
            before = reader.line_num
            for record in reader:
                if len(record) > width:
                    raise CrmFileError(f"{file} line {before + 1}: more fields than the header has")
                before = reader.line_num
    except csv.Error:
        raise CrmFileError(f"{file} line {before + 1}: malformed CSV (check the quotes)") from None
    raise CrmFileError(f"{file}: cannot be read as CSV ({type(exc).__name__})") from None


def _read_parquet(path: Path, known: Sequence[str], typed: dict[str, tuple[type[pl.DataType], ...]]) -> _Table:
    file = path.name
    try:
        raw = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError):
        raise CrmFileError(f"{file}: cannot be read as Parquet") from None
    names = [column_name(c) for c in raw.columns]
    for name in known:
        if names.count(name) > 1:
            raise CrmFileError(f"{file}: column {name} appears more than once")
    raw = raw.rename({c: f"{n}\x00{i}" for i, (c, n) in enumerate(zip(raw.columns, names, strict=True))})
    raw = raw.rename({c: c.split("\x00")[0] for c in raw.columns})
    casts = []
    for name, dtype in raw.schema.items():
        if name not in known or dtype == pl.String or isinstance(dtype, typed.get(name, ())):
            continue
        elif dtype.is_integer() or dtype == pl.Boolean or isinstance(dtype, (pl.Categorical, pl.Enum)):
            casts.append(pl.col(name).cast(pl.String))
        else:
            raise CrmFileError(f"{file}: column {name} has unsupported type {dtype}")
    raw = raw.with_columns(casts)
    return _Table(path, _clean(raw, known), raw.height)


def _load(
    directory: Path,
    stem: str,
    known: Sequence[str],
    *,
    required: bool,
    typed: dict[str, tuple[type[pl.DataType], ...]] | None = None,
) -> _Table | None:
    path = _find(directory, stem, required=required)
    if path is None:
        return None
    try:
        if path.suffix == ".csv":
            return _read_csv(path, known)
        return _read_parquet(path, known, typed or {})
    except OSError as exc:  # unreadable, or replaced/removed while read (write a temporary file, then rename)
        raise CrmFileError(
            f"{path.name}: cannot be read ({type(exc).__name__}); check that this service may read it"
        ) from None


def _bool(table: _Table, name: str) -> pl.Expr:
    """true/false/1/0/yes/no (any case) -> Boolean; blank -> False. Fails on anything else."""
    word = table.col(name).str.to_lowercase()
    table.check(
        word.is_not_null() & ~word.is_in([*TRUE_WORDS, *FALSE_WORDS]), name, "is not one of true/false/1/0/yes/no"
    )
    return word.is_in(TRUE_WORDS).fill_null(False).alias(name)


def _merge_repeats(table: _Table, columns: Sequence[str]) -> None:
    """Rows sharing a crm_id must agree on `columns` where given; blanks take the value of the other rows."""
    frame = table.frame
    for name in columns:
        if name not in frame.columns:
            continue
        first = pl.col(name).drop_nulls().first().over("crm_id")
        first_row = pl.col(_ROW).filter(pl.col(name).is_not_null()).first().over("crm_id")
        probe = frame.with_columns(first.alias("_first"), first_row.alias("_first_row"))
        bad = probe.filter(pl.col(name).is_not_null() & (pl.col(name) != pl.col("_first"))).sort(_ROW)
        if bad.height:
            earlier = table.position(int(bad["_first_row"][0]))
            table.fail(int(bad[_ROW][0]), name, f"differs from {earlier} with the same crm_id")
        frame = probe.with_columns(pl.col("_first").alias(name)).drop("_first", "_first_row")
    table.frame = frame


def _people(directory: Path) -> pl.DataFrame:
    table = _load(directory, "people", PEOPLE_COLUMNS, required=True)
    assert table is not None
    table.require("crm_id", "email")
    table.check(pl.col("crm_id").is_null(), "crm_id", "is empty")
    table.check_ids("crm_id", "account_id")
    _merge_repeats(table, ("kind", "account_id", "name", "is_converted"))
    kind = table.col("kind").str.to_lowercase()
    table.check(kind.is_not_null() & ~kind.is_in(KINDS), "kind", "is not contact or lead")
    table.frame = table.frame.with_columns(
        kind.fill_null("contact").alias("kind"),
        _bool(table, "is_converted"),
        table.col("account_id"),
        table.col("name"),
    )
    exploded = (
        table.frame.with_columns(pl.col("email").str.split(SEPARATOR))
        .explode("email")
        .with_columns(pl.col("email").str.strip_chars().str.to_lowercase().replace("", None))
        .filter(pl.col("email").is_not_null())  # a person without an address cannot match: skipped
    )
    table.frame = exploded
    table.check(
        pl.col("email").str.len_chars() > MAX_ADDRESS_CHARS,
        "email",
        f"is not an address (longer than {MAX_ADDRESS_CHARS} characters)",
    )
    table.check(~pl.col("email").str.contains(EMAIL_RE), "email", "is not an address")
    people = exploded.filter(~((pl.col("kind") == "lead") & pl.col("is_converted")))
    return people_frame(people.unique(["crm_id", "email"], keep="first", maintain_order=True))


def _accounts(directory: Path) -> pl.DataFrame:
    table = _load(directory, "accounts", ACCOUNTS_COLUMNS, required=True)
    assert table is not None
    table.require("crm_id")
    if "domain" not in table.frame.columns and "website" not in table.frame.columns:
        raise CrmFileError(f"{table.file}: missing required column domain or website")
    table.check(pl.col("crm_id").is_null(), "crm_id", "is empty")
    table.check_ids("crm_id")
    _merge_repeats(table, ("name",))
    frame = table.frame.with_columns(table.col("name"), table.col("domain"), table.col("website"))
    source = pl.when(pl.col("domain").is_not_null())
    frame = frame.with_columns(
        source.then(pl.lit("domain")).otherwise(pl.lit("website")).alias("_from"),
        source.then(pl.col("domain")).otherwise(pl.col("website")).str.split(SEPARATOR).alias("_part"),
    ).explode("_part")
    frame = frame.with_columns(pl.col("_part").str.strip_chars().replace("", None))
    parts = frame["_part"].drop_nulls().unique().to_list()
    mapping = {p: website_domain(p) for p in parts}
    frame = frame.with_columns(
        pl.col("_part").replace_strict(mapping, default=None, return_dtype=pl.String).alias("domain")
    )
    table.frame = frame
    table.check(
        (pl.col("_from") == "domain")
        & pl.col("_part").is_not_null()
        & (pl.col("domain").is_null() | pl.col("_part").str.contains("@")),
        "domain",
        "is not a domain name",
    )
    with_domain = frame.filter(pl.col("domain").is_not_null()).unique(
        ["crm_id", "domain"], keep="first", maintain_order=True
    )
    without = (
        frame.unique("crm_id", keep="first", maintain_order=True)
        .join(with_domain.select("crm_id").unique(), on="crm_id", how="anti")
        .with_columns(pl.lit(None, pl.String).alias("domain"))
    )
    rows = pl.concat([with_domain.select(_ROW, *ACCOUNTS_SCHEMA), without.select(_ROW, *ACCOUNTS_SCHEMA)])
    return accounts_frame(rows.sort(_ROW, maintain_order=True))


def _instant(text: str) -> datetime | None:
    """An ISO-8601 text as UTC (naive = UTC); None when it is not ISO-8601, _OUT_OF_RANGE for years outside the
    accepted range (converting those may not even be possible: 0001-01-01T00:00+01:00 is in year 0 in UTC)."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return None
    if not EARLIEST_CREATED.year <= value.year < LATEST_CREATED.year:
        return _OUT_OF_RANGE
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _opportunities(directory: Path) -> pl.DataFrame:
    typed: dict[str, tuple[type[pl.DataType], ...]] = {"created_at": (pl.Datetime, pl.Date)}
    table = _load(directory, "opportunities", OPPORTUNITIES_COLUMNS, required=False, typed=typed)
    if table is None:
        return OPPORTUNITIES_SCHEMA.to_frame()
    table.require("crm_id", "created_at")
    table.check(pl.col("crm_id").is_null(), "crm_id", "is empty")
    table.check_ids("crm_id", "account_id")
    first_row = pl.col(_ROW).first().over("crm_id")
    repeats = table.frame.sort(_ROW).with_columns(first_row.alias("_first")).filter(pl.col(_ROW) != pl.col("_first"))
    if repeats.height:
        table.fail(int(repeats[_ROW][0]), "crm_id", f"repeats {table.position(int(repeats['_first'][0]))}")
    table.check(pl.col("created_at").is_null(), "created_at", "is empty")
    created = pl.col("created_at")
    dtype = table.frame.schema["created_at"]
    if dtype == pl.String:
        texts = table.frame["created_at"].unique().to_list()
        mapping = {t: _instant(t) for t in texts}
        created = created.replace_strict(mapping, return_dtype=pl.Datetime("us", "UTC"))
        table.frame = table.frame.with_columns(created.alias("_created"))
        table.check(pl.col("_created").is_null(), "created_at", "is not an ISO-8601 date-time")
    elif isinstance(dtype, pl.Date):
        created = created.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    elif isinstance(dtype, pl.Datetime) and dtype.time_zone is None:
        created = created.dt.cast_time_unit("us").dt.replace_time_zone("UTC")  # naive = UTC
    else:
        created = created.dt.cast_time_unit("us").dt.convert_time_zone("UTC")
    table.frame = table.frame.with_columns(created.alias("_created"))
    table.check(
        (pl.col("_created") < EARLIEST_CREATED) | (pl.col("_created") >= LATEST_CREATED),
        "created_at",
        f"is before {EARLIEST_CREATED.year} or after {LATEST_CREATED.year - 1}; use the real creation date",
    )
    frame = table.frame.with_columns(
        pl.col("_created").alias("created_at"), table.col("account_id"), table.col("name"), _bool(table, "is_closed")
    )
    return opportunities_frame(frame.filter(~pl.col("is_closed")))  # the snapshot holds open opportunities only


def fetch_snapshot(conn: FilesConnection, http: httpx.Client | None = None) -> CrmSnapshot:
    """Read and validate the directory's files (`http` is not used). Raises CrmFileError with file, line/row,
    column and problem."""
    directory = Path(conn.directory)
    if not directory.is_dir():
        raise CrmFileError("files CRM: the CRM files directory does not exist")
    return CrmSnapshot(
        people=_people(directory), accounts=_accounts(directory), opportunities=_opportunities(directory)
    )


def fetch_changes(conn: FilesConnection, http: httpx.Client | None, since: datetime) -> CrmSnapshot:
    """The whole directory again (no change feed; INCREMENTAL is False, so the refresh never asks)."""
    return fetch_snapshot(conn)
