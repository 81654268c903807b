"""What every CRM adapter gets from the base class: lookup keys, the TTL cache, failure capture and settings
validation (shown on the static file adapter, the one that needs no server)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from crm_adapters.base import CrmConfigError, adapter_types, check_key_spec, create_adapter
from gateway.call.incoming import IncomingCall


@pytest.fixture
def customers_csv(tmp_path: Path) -> Path:
    path = tmp_path / "customers.csv"
    path.write_text("phone,account,name\n+15550101234,A-100,Omar Torres\n")
    return path


def file_adapter(path: Path, **settings: object):
    return create_adapter(
        "file", {"type": "static_file", "path": str(path), **settings}, "test.toml: [crm.file]"
    )


def test_every_adapter_file_in_the_package_is_a_type() -> None:
    assert {"static_file", "sql", "http_json", "redis_hash"} <= set(adapter_types())


def test_unknown_adapter_type_lists_the_known_ones() -> None:
    with pytest.raises(
        CrmConfigError, match=r"test.toml: \[crm.x\] type = 'salesforce' is not an adapter.*static_file"
    ):
        create_adapter("x", {"type": "salesforce"}, "test.toml: [crm.x]")


def test_unknown_setting_names_section_and_key(customers_csv: Path) -> None:
    with pytest.raises(CrmConfigError, match=r"test.toml: \[crm.file\] has unknown key 'deadline'"):
        file_adapter(customers_csv, deadline=1)


def test_setting_of_wrong_type_names_section_key_and_type(customers_csv: Path) -> None:
    with pytest.raises(
        CrmConfigError, match=r"test.toml: \[crm.file\] deadline_s = 'fast' should be a number"
    ):
        file_adapter(customers_csv, deadline_s="fast")


def test_missing_required_setting_is_named() -> None:
    with pytest.raises(
        CrmConfigError, match=r"test.toml: \[crm.file\] is missing required key\(s\) \['path'\]"
    ):
        create_adapter("file", {"type": "static_file"}, "test.toml: [crm.file]")


def test_lookup_key_specs_are_checked() -> None:
    assert check_key_spec("params.account", "[agents.a.crm]") == "params.account"
    with pytest.raises(CrmConfigError, match=r"\[agents.a.crm\] key = 'phone' should be one of caller"):
        check_key_spec("phone", "[agents.a.crm]")


async def test_call_without_the_key_is_no_key_and_no_lookup(customers_csv: Path) -> None:
    result = await file_adapter(customers_csv).lookup(IncomingCall("CA1", caller=None))
    assert result.status == "no_key"
    assert "caller" in result.reason


async def test_key_can_come_from_a_webhook_field(customers_csv: Path) -> None:
    crm = file_adapter(customers_csv, key_field="account")
    call = IncomingCall("CA1", caller="+15550000000", fields={"AccountNumber": "A-100"})
    result = await crm.lookup(call, key="fields.AccountNumber")
    assert result.data["name"] == "Omar Torres"


async def test_cached_record_is_served_until_its_ttl_ends(customers_csv: Path) -> None:
    crm = file_adapter(customers_csv, cache_ttl_s=0.4)
    call = IncomingCall("CA1", caller="+15550101234")
    first = await crm.lookup(call)
    before = customers_csv.stat().st_mtime_ns
    customers_csv.write_text("phone,name\n+15550101234,Renamed\n")
    os.utime(customers_csv, ns=(before + 10**9, before + 10**9))
    second = await crm.lookup(call)
    await asyncio.sleep(0.5)
    third = await crm.lookup(call)
    assert (first.cached, second.cached, third.cached) == (False, True, False)
    assert (second.data["name"], third.data["name"]) == ("Omar Torres", "Renamed")


async def test_failed_lookups_are_not_cached(customers_csv: Path) -> None:
    crm = file_adapter(customers_csv, cache_ttl_s=60)
    call = IncomingCall("CA1", caller="+15550101234")
    saved = customers_csv.read_text()
    customers_csv.rename(customers_csv.with_suffix(".moved"))
    failed = await crm.lookup(call)
    customers_csv.write_text(saved)
    recovered = await crm.lookup(call)
    assert failed.status == "error" and recovered.status == "found" and not recovered.cached


async def test_summary_for_the_call_record_names_fields_not_values(customers_csv: Path) -> None:
    result = await file_adapter(customers_csv).lookup(IncomingCall("CA1", caller="+15550101234"))
    summary = result.summary()
    assert summary["status"] == "found" and summary["fields"] == ["account", "name", "phone"]
    assert "Omar Torres" not in str(summary)
