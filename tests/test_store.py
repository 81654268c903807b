"""The call store: one contract suite run on MemoryStore and on RedisStore against a real redis-server, then
what only a shared Redis store can show (several instances, dead replicas, races), and call records' JSON."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from services import RedisServer, free_port, redis_server  # noqa: F401 (a fixture)

from gateway.call.session import TranscriptPiece
from gateway.ops.records import CallRecord, Escalation, RecordFormatError
from gateway.ops.redis_store import RedisStore
from gateway.ops.store import CallCommand, CallStore, LiveCall, MemoryStore, PreparedEntry, StoreError

SHORT_TTL_S = 0.4  # for expiry tests: long enough for a loaded machine to heartbeat, short for the suite
WAIT_LIMIT_S = 5.0

StoreFactory = Callable[..., Awaitable[CallStore]]


@pytest.fixture(params=["memory", "redis"])
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    """Factory: `await make_store(**settings)` -> a fresh store of the parametrised kind (Redis: a fresh
    key prefix on the shared test server), closed at teardown."""
    opened: list[CallStore] = []
    prefix = f"test{uuid.uuid4().hex[:10]}"

    async def make(**settings: object) -> CallStore:
        if request.param == "memory":
            store: CallStore = MemoryStore(**settings)  # type: ignore[arg-type]
        else:
            server: RedisServer = request.getfixturevalue("redis_server")
            store = RedisStore(server.url, prefix=prefix, **settings)  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.aclose()


@pytest.fixture
async def store(make_store: StoreFactory) -> CallStore:
    return await make_store()


@pytest.fixture
async def redis_stores(redis_server: RedisServer) -> AsyncIterator[Callable[..., RedisStore]]:  # noqa: F811
    """Factory: several RedisStore instances (separate connections, as separate replicas would have) on one
    key prefix of the test server."""
    prefix = f"test{uuid.uuid4().hex[:10]}"
    opened: list[RedisStore] = []

    def make(**settings: object) -> RedisStore:
        store = RedisStore(redis_server.url, prefix=prefix, **settings)  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.aclose()


def live(
    call_id: str, replica: str = "replica-a", started_at: float = 1_700_000_000.0, **kw: object
) -> LiveCall:
    return LiveCall(
        call_id,
        replica,
        agent="support",
        caller="+15550101234",
        called="+15550100000",
        started_at=started_at,
        **kw,  # type: ignore[arg-type]
    )


def full_record(call_id: str = "CA-full", started_at: float = 1_700_000_000.25) -> CallRecord:
    return CallRecord(
        call_id=call_id,
        started_at=started_at,
        stream_id="MZ123",
        caller="+15550101234",
        called="+15550100000",
        agent="support",
        prompt_sha256="ab" * 32,
        voice="NATF2",
        seed=42424242,
        answered_at=started_at + 1.5,
        ended_at=started_at + 65.0,
        end_reason="max_duration",
        escalations=(Escalation(12.32, "dtmf", "caller pressed 0", ("webhook", "transfer:+15550109999")),),
        crm_status="found",
        transcript=(TranscriptPiece(0.08, "Hello,"), TranscriptPiece(0.16, " Grüße — how can I help?")),
        counters={"agent_frames_sent": 800, "agent_frames_dropped": 3},
    )


async def until(condition: Callable[[], Awaitable[bool]], timeout_s: float = WAIT_LIMIT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await condition():
            return True
        await asyncio.sleep(0.02)
    return await condition()


# --- contract: live calls ---------------------------------------------------------------------------


async def test_registered_call_can_be_got_and_listed(store: CallStore) -> None:
    call = live("CA1", details={"state": "ringing"})
    await store.register(call)
    assert await store.get_live("CA1") == call
    assert await store.list_live() == [call]


async def test_unknown_live_call_is_none(store: CallStore) -> None:
    assert await store.get_live("CA-nobody") is None


async def test_live_calls_are_listed_oldest_first_and_by_replica(store: CallStore) -> None:
    newer = live("CA-newer", "replica-b", started_at=200.0)
    older = live("CA-older", "replica-a", started_at=100.0)
    await store.register(newer)
    await store.register(older)
    assert [c.call_id for c in await store.list_live()] == ["CA-older", "CA-newer"]
    assert [c.call_id for c in await store.list_live("replica-b")] == ["CA-newer"]


async def test_update_merges_details_into_the_live_call(store: CallStore) -> None:
    await store.register(live("CA1", details={"state": "ringing", "escalations": 0}))
    updated = await store.update("CA1", {"state": "answered", "answered_at": 1_700_000_001.5})
    expected = {"state": "answered", "escalations": 0, "answered_at": 1_700_000_001.5}
    assert updated is not None and dict(updated.details) == expected
    got = await store.get_live("CA1")
    assert got is not None and dict(got.details) == expected


async def test_update_of_a_call_that_is_not_live_is_none(store: CallStore) -> None:
    assert await store.update("CA-nobody", {"state": "answered"}) is None
    assert await store.get_live("CA-nobody") is None


async def test_unregister_removes_the_call_and_says_whether_it_was_live(store: CallStore) -> None:
    await store.register(live("CA1"))
    assert await store.unregister("CA1") is True
    assert await store.get_live("CA1") is None
    assert await store.list_live() == []
    assert await store.unregister("CA1") is False


async def test_call_without_heartbeat_expires_after_the_ttl(make_store: StoreFactory) -> None:
    store = await make_store(live_ttl_s=SHORT_TTL_S)
    await store.register(live("CA1"))
    assert await store.get_live("CA1") is not None
    started = time.monotonic()
    assert await until(lambda: _is_gone(store, "CA1"))
    assert time.monotonic() - started >= SHORT_TTL_S * 0.5  # not gone at once
    assert await store.list_live() == []


async def _is_gone(store: CallStore, call_id: str) -> bool:
    return await store.get_live(call_id) is None


async def test_heartbeat_keeps_only_its_replicas_calls_alive(make_store: StoreFactory) -> None:
    store = await make_store(live_ttl_s=SHORT_TTL_S)
    await store.register(live("CA-kept", "replica-a"))
    await store.register(live("CA-dropped", "replica-b"))
    assert await store.heartbeat("replica-a") == 1
    deadline = time.monotonic() + SHORT_TTL_S * 3
    while time.monotonic() < deadline:  # heartbeat at a quarter of the ttl, for three ttls
        await asyncio.sleep(SHORT_TTL_S / 4)
        assert await store.heartbeat("replica-a") == 1
    assert [c.call_id for c in await store.list_live()] == ["CA-kept"]
    assert await store.heartbeat("replica-b") == 0


async def test_updates_keep_a_call_alive_past_the_ttl(make_store: StoreFactory) -> None:
    store = await make_store(live_ttl_s=SHORT_TTL_S)
    await store.register(live("CA1"))
    deadline = time.monotonic() + SHORT_TTL_S * 3
    while time.monotonic() < deadline:
        await asyncio.sleep(SHORT_TTL_S / 4)
        assert await store.update("CA1", {"heard_s": round(time.monotonic(), 3)}) is not None
    assert await store.get_live("CA1") is not None


async def test_call_registered_again_by_another_replica_moves_to_it(store: CallStore) -> None:
    await store.register(live("CA1", "replica-a"))
    await store.register(live("CA1", "replica-b"))
    assert await store.heartbeat("replica-a") == 0
    assert await store.heartbeat("replica-b") == 1
    async with await store.subscribe("replica-b") as new_owner:
        assert await store.send_command(CallCommand("CA1", "hangup"))
        assert await new_owner.next(timeout_s=WAIT_LIMIT_S) == CallCommand("CA1", "hangup")


# --- contract: call records -------------------------------------------------------------------------


async def test_record_round_trips_through_the_store(store: CallStore) -> None:
    record = full_record()
    await store.save_record(record)
    assert await store.get_record(record.call_id) == record


async def test_unknown_record_is_none(store: CallStore) -> None:
    assert await store.get_record("CA-nobody") is None


async def test_records_are_listed_newest_first_within_the_limit(store: CallStore) -> None:
    for i in (3, 1, 4, 2, 5):
        await store.save_record(CallRecord(call_id=f"CA{i}", started_at=1000.0 + i))
    assert [r.call_id for r in await store.list_records(limit=3)] == ["CA5", "CA4", "CA3"]


async def test_records_before_a_time_give_the_next_page(store: CallStore) -> None:
    for i in range(1, 6):
        await store.save_record(CallRecord(call_id=f"CA{i}", started_at=1000.0 + i))
    first = await store.list_records(limit=2)
    second = await store.list_records(limit=2, before=first[-1].started_at)
    assert [r.call_id for r in second] == ["CA3", "CA2"]


async def test_retention_cap_drops_the_oldest_records(make_store: StoreFactory) -> None:
    store = await make_store(records_kept=3)
    for i in range(1, 6):
        await store.save_record(CallRecord(call_id=f"CA{i}", started_at=1000.0 + i))
    assert [r.call_id for r in await store.list_records(limit=10)] == ["CA5", "CA4", "CA3"]
    assert await store.get_record("CA1") is None


async def test_saving_a_record_again_replaces_it(store: CallStore) -> None:
    await store.save_record(CallRecord(call_id="CA1", started_at=1000.0, end_reason="error: engine_lost"))
    await store.save_record(CallRecord(call_id="CA1", started_at=1000.0, end_reason="caller_hung_up"))
    records = await store.list_records()
    assert [(r.call_id, r.end_reason) for r in records] == [("CA1", "caller_hung_up")]


# --- contract: control commands ---------------------------------------------------------------------


async def test_command_reaches_only_the_replica_owning_the_call(store: CallStore) -> None:
    await store.register(live("CA1", "replica-a"))
    async with await store.subscribe("replica-a") as owner, await store.subscribe("replica-b") as other:
        command = CallCommand("CA1", "escalate", "supervisor asked")
        assert await store.send_command(command) is True
        assert await owner.next(timeout_s=WAIT_LIMIT_S) == command
        assert await other.next(timeout_s=0.2) is None


async def test_commands_arrive_in_the_order_sent(store: CallStore) -> None:
    await store.register(live("CA1", "replica-a"))
    sent = [CallCommand("CA1", "escalate", "first"), CallCommand("CA1", "hangup", "second")]
    async with await store.subscribe("replica-a") as owner:
        for command in sent:
            await store.send_command(command)
        assert [await owner.next(timeout_s=WAIT_LIMIT_S) for _ in sent] == sent


async def test_command_for_a_call_that_is_not_live_is_not_delivered(store: CallStore) -> None:
    async with await store.subscribe("replica-a") as owner:
        assert await store.send_command(CallCommand("CA-nobody", "hangup")) is False
        assert await owner.next(timeout_s=0.2) is None


async def test_command_without_a_listening_replica_is_not_delivered(store: CallStore) -> None:
    await store.register(live("CA1", "replica-a"))
    assert await store.send_command(CallCommand("CA1", "hangup")) is False


# --- Redis only: several replicas on one server -----------------------------------------------------


async def test_dead_replicas_calls_expire_while_a_live_replica_keeps_its_own(
    redis_stores: Callable[..., RedisStore],
) -> None:
    dying, surviving = redis_stores(live_ttl_s=SHORT_TTL_S), redis_stores(live_ttl_s=SHORT_TTL_S)
    await dying.register(live("CA-dying", "replica-dying"))
    await surviving.register(live("CA-surviving", "replica-surviving"))
    await dying.aclose()  # the process is gone: no heartbeat, no unregister
    deadline = time.monotonic() + SHORT_TTL_S * 3
    while time.monotonic() < deadline:
        await surviving.heartbeat("replica-surviving")
        await asyncio.sleep(SHORT_TTL_S / 4)
    assert [c.call_id for c in await surviving.list_live()] == ["CA-surviving"]
    assert await surviving.send_command(CallCommand("CA-dying", "hangup")) is False


async def test_command_sent_through_one_instance_reaches_the_subscriber_of_another(
    redis_stores: Callable[..., RedisStore],
) -> None:
    owner_store, api_store = redis_stores(), redis_stores()
    await owner_store.register(live("CA1", "replica-owner"))
    async with await owner_store.subscribe("replica-owner") as commands:
        command = CallCommand("CA1", "hangup", "agent asked from the dashboard")
        assert await api_store.send_command(command) is True
        assert await commands.next(timeout_s=WAIT_LIMIT_S) == command


async def test_records_saved_by_one_instance_are_read_by_another(
    redis_stores: Callable[..., RedisStore],
) -> None:
    writer, reader = redis_stores(), redis_stores()
    record = full_record()
    await writer.save_record(record)
    assert await reader.list_records() == [record]


async def test_live_call_registered_by_one_instance_is_seen_by_another(
    redis_stores: Callable[..., RedisStore],
) -> None:
    owner, api = redis_stores(), redis_stores()
    await owner.register(live("CA1", "replica-owner"))
    assert await api.get_live("CA1") == live("CA1", "replica-owner")


async def test_unreachable_redis_is_a_store_error_naming_the_server() -> None:
    port = free_port()
    store = RedisStore(f"redis://127.0.0.1:{port}/0", prefix="nobody")
    with pytest.raises(StoreError, match=rf"redis store 127.0.0.1:{port}/0 \(nobody\): list live calls"):
        await store.list_live()
    await store.aclose()


def test_non_redis_url_is_refused_naming_it() -> None:
    with pytest.raises(StoreError, match=r"store url 'http://127.0.0.1:6379' should start with redis://"):
        RedisStore("http://127.0.0.1:6379")


# --- call records as JSON ---------------------------------------------------------------------------


def test_record_round_trips_through_json() -> None:
    record = full_record()
    assert CallRecord.from_json(record.to_json()) == record


def test_record_of_a_call_that_failed_before_answer_round_trips() -> None:
    record = CallRecord(
        call_id="CA-failed", started_at=1000.0, ended_at=1000.4, end_reason="engine_unavailable"
    )
    again = CallRecord.from_json(record.to_json())
    assert again == record
    assert again.answered_at is None and again.duration_s == pytest.approx(0.4)


def test_record_with_a_wrong_type_names_the_call_and_key() -> None:
    data = full_record().to_dict() | {"seed": "42"}
    with pytest.raises(RecordFormatError, match=r"call record 'CA-full': seed = '42' should be an integer"):
        CallRecord.from_dict(data)


def test_record_of_an_unknown_version_is_refused() -> None:
    data = full_record().to_dict() | {"version": 99}
    with pytest.raises(RecordFormatError, match=r"call record 'CA-full': version 99 is not 1"):
        CallRecord.from_dict(data)


def test_record_that_is_not_a_json_object_is_refused() -> None:
    with pytest.raises(RecordFormatError, match="is a JSON list, not an object"):
        CallRecord.from_json("[1, 2]")


# --- prepared calls ----------------------------------------------------------------------------------


async def test_a_prepared_call_is_claimed_once_and_only_with_its_token(store: CallStore) -> None:
    entry = PreparedEntry("CA1", "receptionist", "replica-a", "+15550001111", "+15550002222", 1700000000.0)
    await store.put_prepared(entry, "the-token", ttl_s=30)
    assert await store.claim_prepared("CA1", "not-the-token") is None
    assert await store.claim_prepared("CA2", "the-token") is None
    assert await store.claim_prepared("CA1", "the-token") == entry
    assert await store.claim_prepared("CA1", "the-token") is None  # single use
    assert await store.drop_prepared("CA1") is False  # claimed: nothing left to drop


async def test_a_prepared_call_and_its_engine_expire(store: CallStore) -> None:
    await store.put_prepared(PreparedEntry("CA1", "a", "r"), "t", ttl_s=0.2)
    await store.put_prepared_engine("CA1", '{"ticket": "x"}', ttl_s=0.2)
    assert await store.prepared_engine("CA1") == '{"ticket": "x"}'
    await asyncio.sleep(0.3)
    assert await store.claim_prepared("CA1", "t") is None
    assert await store.prepared_engine("CA1") is None
    await store.put_prepared(PreparedEntry("CA2", "a", "r"), "t", ttl_s=30)
    assert await store.drop_prepared("CA2") is True and await store.claim_prepared("CA2", "t") is None


async def test_two_replicas_racing_for_one_prepared_call_get_it_once(redis_stores) -> None:
    a, b = redis_stores(), redis_stores()
    await a.put_prepared(PreparedEntry("CA1", "a", "r"), "t", ttl_s=30)
    claims = await asyncio.gather(*(store.claim_prepared("CA1", "t") for store in (a, b) for _ in range(10)))
    assert sum(claim is not None for claim in claims) == 1
