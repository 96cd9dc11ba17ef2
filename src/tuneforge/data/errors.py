"""The one error type of the data pipeline: it names where the bad input is.

A user with 50,000 rows needs "train.jsonl, row 17, field 'messages[2].role'", not a KeyError deep
inside datasets.map. Every check in `tuneforge.data` raises `DataError` with as much of the location
as it knows; rows are numbered from 0, as `dataset[17]` numbers them.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data. `source` (a file or dataset name), `row` (0-based) and `field` say where."""

    def __init__(self, message: str, *, source: str | None = None, row: int | None = None, field: str | None = None):
        self.reason = message
        self.source = source
        self.row = row
        self.field = field
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.source is not None:
            where.append(str(self.source))
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        return f"{', '.join(where)}: {self.reason}" if where else self.reason

    def located(self, *, source: str | None = None, row: int | None = None) -> "DataError":
        """The same error with a source/row filled in by an outer caller that knows them."""
        return DataError(
            self.reason,
            source=self.source if self.source is not None else source,
            row=self.row if self.row is not None else row,
            field=self.field,
        )
