"""CRM adapter over a static CSV or JSON file: one record per customer, found by a key column.

The file is read at start-up (so a missing or malformed file stops the gateway with a clear message) and read
again whenever its modification time changes, so an export dropped in place is picked up without a restart.
"""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from crm_adapters.base import CrmAdapter, CrmConfigError, CrmLookupError, CrmSettings
from gateway.call.incoming import normalise_number

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class StaticFileSettings(CrmSettings):
    path: str  # .csv (header row) or .json; a relative path is taken from the config file's folder
    key_field: str = "phone"  # column (CSV) or field (JSON records) holding the lookup key
    format: str = ""  # "csv" or "json"; empty: from the file's suffix


class StaticFileAdapter(CrmAdapter):
    """Records from one CSV or JSON file, indexed by `key_field` (compared without punctuation)."""

    settings_type = StaticFileSettings
    settings: StaticFileSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.path = self.resolve_path(self.settings.path)
        self.format = self.settings.format or self.path.suffix.lower().lstrip(".")
        if self.format not in ("csv", "json"):
            raise CrmConfigError(
                f'{self.where} format = {self.format!r}: give a .csv or .json path, or format = "csv"/"json"'
            )
        self._index: dict[str, Mapping[str, Any]] = {}
        self._loaded_mtime: int | None = None
        try:
            self._reload()
        except CrmLookupError as exc:
            raise CrmConfigError(f"{self.where} path = {self.settings.path!r}: {exc}") from None

    def describe(self) -> str:
        return f"static_file {self.path}"

    async def fetch(self, key: str) -> Mapping[str, Any] | None:
        if self._file_mtime() != self._loaded_mtime:
            await asyncio.to_thread(self._reload)
        return self._index.get(normalise_number(key))

    def _file_mtime(self) -> int | None:
        try:
            return os.stat(self.path).st_mtime_ns
        except OSError:
            return None

    def _reload(self) -> None:
        mtime = self._file_mtime()
        if mtime is None:
            raise CrmLookupError(f"{self.path} does not exist or cannot be read")
        try:
            text = self.path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise CrmLookupError(f"{self.path} cannot be read as UTF-8 text: {exc}") from None
        records = self._parse_csv(text) if self.format == "csv" else self._parse_json(text)
        index: dict[str, Mapping[str, Any]] = {}
        duplicates = 0
        for record in records:
            key = record.get(self.settings.key_field)
            if key is None or isinstance(key, dict | list) or not normalise_number(str(key)):
                continue  # a record without a usable key can never be found
            if normalise_number(str(key)) in index:
                duplicates += 1  # the first record for a key wins, as a reader of the file would expect
                continue
            index[normalise_number(str(key))] = record
        if duplicates:
            log.warning(
                "%s: %d records repeat a %s already seen; the first one is used",
                self.path,
                duplicates,
                self.settings.key_field,
            )
        self._index = index
        self._loaded_mtime = mtime
        log.info("%s: %d records by %s", self.path, len(index), self.settings.key_field)

    def _parse_csv(self, text: str) -> list[Mapping[str, Any]]:
        reader = csv.DictReader(text.splitlines())
        if reader.fieldnames is None or self.settings.key_field not in reader.fieldnames:
            raise CrmLookupError(
                f"{self.path} has no column {self.settings.key_field!r} in its header row "
                f"(columns: {reader.fieldnames or []}); set key_field to the column holding the key"
            )
        # An empty cell means "unknown", so the template's default applies rather than an empty string.
        return [
            {name: value for name, value in row.items() if name is not None and value not in (None, "")}
            for row in reader
        ]

    def _parse_json(self, text: str) -> list[Mapping[str, Any]]:
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CrmLookupError(f"{self.path} is not valid JSON: {exc}") from None
        if isinstance(document, dict):  # {"<key>": {record}, ...}
            entries = [
                {self.settings.key_field: key, **record} if isinstance(record, dict) else record
                for key, record in document.items()
            ]
        elif isinstance(document, list):  # [{record with key_field}, ...]
            entries = document
        else:
            raise CrmLookupError(f"{self.path} must hold a list of records or an object of records by key")
        malformed = [i for i, entry in enumerate(entries) if not isinstance(entry, dict)]
        if malformed:
            raise CrmLookupError(
                f"{self.path}: record {malformed[0] + 1} of {len(entries)} is not an object of named fields"
            )
        return entries


ADAPTER = StaticFileAdapter
