"""The static file adapter on real CSV and JSON files: lookups, reloads, and malformed files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from crm_adapters.base import CrmConfigError, create_adapter
from gateway.call.incoming import IncomingCall

CSV = (
    "phone,name,next_pickup,balance\n"
    "+1 (555) 010-1234,Omar Torres,2026-04-12,\n"
    "+15550105678,Ana Ruiz,,12.50\n"
)


def file_adapter(path: Path, **settings: Any):
    return create_adapter(
        "file", {"type": "static_file", "path": str(path), **settings}, "test.toml: [crm.file]"
    )


def caller(number: str) -> IncomingCall:
    return IncomingCall("CA1", caller=number)


def rewrite(path: Path, text: str) -> None:
    """Replace the file and move its modification time on, as a new export would."""
    before = path.stat().st_mtime_ns
    path.write_text(text)
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


@pytest.fixture
def customers_csv(tmp_path: Path) -> Path:
    path = tmp_path / "customers.csv"
    path.write_text(CSV)
    return path


async def test_csv_row_is_found_by_number_written_with_punctuation(customers_csv: Path) -> None:
    result = await file_adapter(customers_csv).lookup(caller("+15550101234"))
    assert result.status == "found"
    assert result.data["name"] == "Omar Torres"


async def test_csv_empty_cells_are_left_out_of_the_record(customers_csv: Path) -> None:
    result = await file_adapter(customers_csv).lookup(caller("+15550105678"))
    assert dict(result.data) == {"phone": "+15550105678", "name": "Ana Ruiz", "balance": "12.50"}


async def test_unknown_caller_is_not_found(customers_csv: Path) -> None:
    result = await file_adapter(customers_csv).lookup(caller("+15559999999"))
    assert result.status == "not_found"


async def test_json_object_of_records_by_key(tmp_path: Path) -> None:
    path = tmp_path / "customers.json"
    path.write_text(json.dumps({"A-100": {"name": "Omar Torres", "bins": ["trash", "compost"]}}))
    crm = file_adapter(path, key_field="account")
    result = await crm.lookup(IncomingCall("CA1", params={"account": "A-100"}), key="params.account")
    assert dict(result.data) == {"account": "A-100", "name": "Omar Torres", "bins": ["trash", "compost"]}


async def test_json_list_of_records_with_key_field(tmp_path: Path) -> None:
    path = tmp_path / "customers.json"
    path.write_text(json.dumps([{"phone": "+15550101234", "name": "Omar Torres"}, {"name": "no key"}]))
    result = await file_adapter(path).lookup(caller("+15550101234"))
    assert result.data["name"] == "Omar Torres"


async def test_changed_file_is_read_again(customers_csv: Path) -> None:
    crm = file_adapter(customers_csv)
    assert (await crm.lookup(caller("+15550101234"))).data["name"] == "Omar Torres"
    rewrite(customers_csv, "phone,name\n+15550101234,Omar T. Torres\n")
    assert (await crm.lookup(caller("+15550101234"))).data["name"] == "Omar T. Torres"


async def test_file_made_malformed_after_start_fails_the_lookup_not_the_call(tmp_path: Path) -> None:
    path = tmp_path / "customers.json"
    path.write_text(json.dumps([{"phone": "+15550101234", "name": "Omar Torres"}]))
    crm = file_adapter(path)
    rewrite(path, '[{"phone": "+15550101234", "name": "Omar"')
    result = await crm.lookup(caller("+15550101234"))
    assert result.status == "error"
    assert str(path) in result.reason and "not valid JSON" in result.reason


def test_csv_without_the_key_column_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "customers.csv"
    path.write_text("telephone,name\n+15550101234,Omar\n")
    with pytest.raises(
        CrmConfigError, match=r"test.toml: \[crm.file\] path = .*no column 'phone'.*telephone"
    ):
        file_adapter(path)


def test_json_record_that_is_not_an_object_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "customers.json"
    path.write_text(json.dumps([{"phone": "+15550101234"}, "Omar Torres"]))
    with pytest.raises(CrmConfigError, match=r"record 2 of 2 is not an object"):
        file_adapter(path)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(CrmConfigError, match=r"\[crm.file\] path = .*nothing.csv.*does not exist"):
        file_adapter(tmp_path / "nothing.csv")
