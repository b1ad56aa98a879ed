"""``AsyncClient``: the producer's surface for asyncio code (FastAPI, async Django views).

The same calls as ``routing.client.Client``, awaited, on ``redis.asyncio``: nothing blocks the
event loop, and ``await result(id)`` waits on the request's notify list (BLPOP) instead of
polling. It builds on the sync client's parts rather than copies of them: the validation
(``prepare_items``), the key names (``Keys``), the Lua scripts of ``routing/lua`` and the sync
store's own parsing of a stored request. Like ``Client``, it imports neither ``config`` nor
``tasks``, and no Celery or torch.

    from routing.client import AsyncClient

    async with AsyncClient("redis://localhost:6379/0") as mb:
        ticket = await mb.submit(body={"model": "gpt-4o-mini", "messages": [...]}, lane="urgent")
        answer = await mb.result(ticket.id, timeout=60)

One client per event loop: redis.asyncio's connections belong to the loop that opened them
(in a FastAPI app, build it in the lifespan).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from functools import partial
from typing import Any

from redis.asyncio.client import Pipeline

from routing.client import Producer, as_request, no_lanes_table, prepare_items
from routing.errors import InvalidRequest, LaneFull, NotFound, ResultTimeout
from routing.keys import Keys, lane_of, new_request_id, shard_of
from routing.models import (
    Prepared,
    Request,
    Result,
    ServiceConfig,
    StatusInfo,
    Ticket,
    prepare,
)
from routing.states import State
from routing.store.base import decode, dumps, store_errors
from routing.store.connect import aclose_async, connect_async, is_cluster
from routing.store.lanes import DEFAULT_RESULT_TTL_S
from routing.store.reads import ReadOps, wait_slice_s
from routing.store.replicas_async import AsyncReplication
from routing.store.scripts import script_sources
from routing.store.submit import TAKEOVER_S, SubmitOps, shard_cap

__all__ = ["AsyncClient"]

_CONFIG_TTL_S = 30.0
#: BLPOP waits in slices this long, under any socket timeout, so a dead server is noticed.
#: Rounds of creating a request whose custom_id a dead submitter reserved (see ``_enqueue``).
_ROUNDS = 3


async def _hget(key: str, field: str, pipe: Pipeline) -> None:
    """Queued, not awaited: awaiting a cluster pipeline (re)initialises it, dropping the queue."""
    pipe.hget(key, field)


class _Stored(SubmitOps, ReadOps):
    """The sync store's own code for what this client writes and reads, minus its connection.

    The store builds each script call this client makes (``submit_one_call``, ``cancel_call``)
    and parses a request's hash (``status``, ``result``: ``_hash`` hands them the hash read
    here), so both clients write and read requests the same way. It holds no connection: only
    those methods, which do no I/O, are called on it.
    """

    def __init__(self, keys: Keys, result_ttl_s: int, h: dict[str, str]) -> None:
        self.keys, self.result_ttl_s, self._h = keys, result_ttl_s, h

    def _hash(self, request_id: str) -> dict[str, str]:
        return self._h


class AsyncClient(Producer):
    """A producer's handle on mixbatch for asyncio: ``Client``'s calls, awaited."""

    def _connect(self) -> None:
        self.keys = Keys(self.namespace)
        self.redis = connect_async(self.redis_url)
        self.cluster = is_cluster(self.redis_url)
        self.replication = AsyncReplication.for_url(self.redis_url)
        self.scripts = {n: self.redis.register_script(s) for n, s in script_sources().items()}
        self._result_ttl_s = DEFAULT_RESULT_TTL_S
        self._config: tuple[float, ServiceConfig] | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.replication.aclose()
        await aclose_async(self.redis)

    async def config(self) -> ServiceConfig:
        """The lanes table and limits the service published, re-read every 30 s."""
        if self._fixed_config is not None:
            return self._fixed_config
        if self._config is None or time.monotonic() - self._config[0] > _CONFIG_TTL_S:
            with store_errors(self.redis_url):
                raw = await self.redis.get(self.keys.config())
            if raw is None:
                raise no_lanes_table(self.redis_url, self.keys.ns, "AsyncClient")
            self._config = (time.monotonic(), ServiceConfig.model_validate_json(raw))
        return self._config[1]

    # -- submitting ----------------------------------------------------------------------------

    async def submit(
        self, request: Request | dict[str, Any] | None = None, /, **fields: Any
    ) -> Ticket:
        """Enqueue one request; durable once this returns. As ``Client.submit``."""
        if request is None:
            request = fields
        elif fields:
            raise TypeError("pass a Request (or dict) or keyword fields, not both")
        config = await self.config()
        prepared = prepare(as_request(request, self.tenant), config, time.time())
        return (await self._enqueue([prepared], config))[0]

    async def submit_many(
        self,
        items: Iterable[Request | dict[str, Any]],
        *,
        chunk_size: int = 1000,
        on_progress: Callable[[int], None] | None = None,
    ) -> list[Ticket]:
        """Enqueue many, one pipelined round trip per ``chunk_size``. As ``Client.submit_many``:
        every item is validated before any is written, and ``LaneFull`` carries the tickets
        accepted before the lane filled and the indices refused (that one and every later one).
        """
        config = await self.config()
        prepared = prepare_items(items, config, self.tenant, time.time())
        tickets: list[Ticket] = []
        for start in range(0, len(prepared), chunk_size):
            chunk = prepared[start : start + chunk_size]
            tickets.extend(
                await self._enqueue(
                    chunk, config, before=tickets, offset=start, total=len(prepared)
                )
            )
            if on_progress is not None:
                on_progress(len(chunk))
        return tickets

    async def prepare_many(self, items: Iterable[Request | dict[str, Any]]) -> list[Prepared]:
        """Validate without writing; raises on the first bad item, naming its index."""
        return prepare_items(items, await self.config(), self.tenant, time.time())

    async def _enqueue(
        self,
        items: Sequence[Prepared],
        config: ServiceConfig,
        *,
        before: Sequence[Ticket] = (),
        offset: int = 0,
        total: int | None = None,
    ) -> list[Ticket]:
        """Create each request with ``submit_one.lua`` (custom_id reserved and request created
        in one step), every request of a round in one pipelined round trip; on a Redis Cluster
        in two steps (``_create_apart``). Once created, the requests' masters' replicas have
        them (``MIXBATCH_REDIS_MIN_REPLICAS``), or ``ReplicationTimeout`` is raised.

        A custom_id already reserved answers with the first request's ticket. When that first
        submitter died before creating its request (reserved longer than ``TAKEOVER_S`` ago,
        no request), its reservation is released and the request created in the next round
        under the id it reserved, as the sync store does, so a ticket handed out for that id
        comes true. ``before``, ``offset`` and ``total`` place this chunk in a bigger submit,
        for ``LaneFull``'s accepted tickets and refused indices.
        """
        now = time.time()
        pending = list(items)
        ids = [new_request_id(p.lane, now, config.lane(p.lane).shards) for p in pending]
        tickets: dict[int, Ticket] = {}
        full: list[int] = []
        todo = list(range(len(pending)))
        for round_ in range(_ROUNDS):
            if self.cluster:
                replies = await self._create_apart(pending, ids, todo, config, now)
            else:
                replies = await self._pipelined(
                    [self._submit_one(pending[i], ids[i], config, now) for i in todo]
                )
            created = [i for i, reply in zip(todo, replies, strict=True) if int(reply[0]) == 1]
            await self.replication.confirm(self.redis, [self.keys.request(ids[i]) for i in created])
            dups: dict[int, str] = {}
            for i, reply in zip(todo, replies, strict=True):
                code, item = int(reply[0]), pending[i]
                if code == 1:
                    tickets[i] = Ticket(
                        id=ids[i], custom_id=item.custom_id, lane=item.lane, deadline=item.deadline
                    )
                elif code == 0:
                    dups[i] = decode(reply[1])
                elif code == -1:
                    full.append(i)
                else:  # prepare() already refuses what the script refuses
                    raise InvalidRequest("not a finite number", field=f"items[{offset + i}]")
            last = round_ == _ROUNDS - 1
            todo = await self._first_submitters(pending, ids, dups, tickets, now, last)
            if not todo:
                break
        if full:
            lane = pending[full[0]].lane
            end = offset + len(pending)
            raise LaneFull(
                lane,
                config.lane(lane).max_queued,
                accepted=[*before, *(tickets[i] for i in sorted(tickets))],
                rejected=[offset + i for i in full] + list(range(end, total or end)),
            )
        return [tickets[i] for i in range(len(pending))]

    async def _first_submitters(
        self,
        pending: list[Prepared],
        ids: list[str],
        dups: dict[int, str],
        tickets: dict[int, Ticket],
        now: float,
        last: bool,
    ) -> list[int]:
        """Tickets of the requests that reserved these custom_ids first (``dups``: index ->
        reservation ``"<id>|<reserved at>"``); returns the indices to create in another round
        (none in the ``last`` round: a reservation lost again is then answered as it stands)."""
        owners = {i: value.partition("|") for i, value in dups.items()}
        deadlines = await self._pipelined(
            [partial(_hget, self.keys.request(rid), "deadline") for rid, _, _ in owners.values()]
        )
        again: list[int] = []
        for (i, (rid, _, stamp)), deadline in zip(owners.items(), deadlines, strict=True):
            item = pending[i]
            if deadline is None and now - float(stamp or 0) > TAKEOVER_S and not last:
                idem = self.keys.idempotency(item.tenant, item.custom_id or "")
                with store_errors(self.redis_url):
                    released = await self.scripts["release_idempotency"](keys=[idem], args=[rid])
                if released:
                    ids[i] = rid
                    pending[i] = item.model_copy(update={"lane": lane_of(rid)})
                    again.append(i)
                    continue
            tickets[i] = Ticket(
                id=rid,
                custom_id=item.custom_id,
                lane=lane_of(rid),
                deadline=float(deadline) if deadline is not None else item.deadline,
                duplicate=True,
            )
        return again

    async def _create_apart(
        self,
        pending: list[Prepared],
        ids: list[str],
        todo: list[int],
        config: ServiceConfig,
        now: float,
    ) -> list[list[Any]]:
        """``submit_one.lua``'s replies for a Redis Cluster, where a custom_id (its tenant's
        slot) and a request (its lane's slot) cannot share one script: reserve the custom_ids
        (``claim_ids.lua``), then create the winners and those without one
        (``submit_many.lua``, one request each), releasing the custom_id of one refused, as the
        sync store does. Each step is one pipelined round trip."""
        k, st = self.keys, self._store()
        reserve = [i for i in todo if pending[i].custom_id]
        rows = [[f"{ids[i]}|{now!r}", st._idem_ttl(pending[i], now)] for i in reserve]
        held = await self._pipelined(
            [
                partial(
                    self._eval,
                    "claim_ids",
                    [k.idempotency(pending[i].tenant, pending[i].custom_id or "")],
                    [dumps([row])],
                )
                for i, row in zip(reserve, rows, strict=True)
            ]
        )
        replies: dict[int, list[Any]] = {
            i: [0, out[0]] for i, out in zip(reserve, held, strict=True) if out[0] != 1
        }
        create = [i for i in todo if i not in replies]
        codes = await self._pipelined(
            [self._create_one(pending[i], ids[i], config, now) for i in create]
        )
        for i, out in zip(create, codes, strict=True):
            replies[i] = [int(out[0])]
            if replies[i][0] != 1 and pending[i].custom_id:
                idem = k.idempotency(pending[i].tenant, pending[i].custom_id or "")
                await self._pipelined(
                    [partial(self._eval, "release_idempotency", [idem], [ids[i]])]
                )
        return [replies[i] for i in todo]

    def _create_one(
        self, item: Prepared, rid: str, config: ServiceConfig, now: float
    ) -> Callable[[Pipeline], Awaitable[Any]]:
        """``submit_many.lua`` for one request in its lane shard's slot, for a pipeline."""
        k, lane, shard = self.keys, lane_of(rid), shard_of(rid)
        if item.lane != lane:
            item = item.model_copy(update={"lane": lane})
        row = [
            rid,
            repr(item.deadline),
            item.tenant,
            item.custom_id or "",
            item.max_attempts,
            item.model_dump_json(),
        ]
        keys = [
            k.queue(lane, shard),
            k.queue_age(lane, shard),
            k.counts(lane, shard),
            k.request(rid),
        ]
        args = [shard_cap(config.lane(lane)), repr(now), State.QUEUED.value, dumps([row])]
        return partial(self._eval, "submit_many", keys, args)

    @staticmethod
    async def _eval(name: str, keys: list[str], args: list[Any], pipe: Pipeline) -> None:
        """Queue a script as ``EVAL`` with its text: a cluster pipeline routes it by its keys
        (which share one slot), and a node it lands on need never have loaded it."""
        pipe.execute_command("EVAL", script_sources()[name], len(keys), *keys, *args)

    def _submit_one(
        self, item: Prepared, rid: str, config: ServiceConfig, now: float
    ) -> Callable[[Pipeline], Awaitable[Any]]:
        """``submit_one.lua`` for one request, as the sync store calls it, for a pipeline."""
        keys, args = self._store().submit_one_call(item, rid, config, now)
        return partial(self.scripts["submit_one"], keys, args)

    async def _pipelined(self, calls: Sequence[Callable[[Pipeline], Awaitable[Any]]]) -> list[Any]:
        """Queue each call on one pipeline (``call(pipe)``) and run them in one round trip."""
        if not calls:
            return []
        with store_errors(self.redis_url):
            async with self.redis.pipeline(transaction=False) as pipe:
                for call in calls:
                    await call(pipe)
                return list(await pipe.execute())

    # -- reading -------------------------------------------------------------------------------

    async def _stored(self, request_id: str) -> _Stored:
        with store_errors(self.redis_url):
            raw = await self.redis.hgetall(self.keys.request(request_id))
        if not raw:
            raise NotFound(request_id)
        return self._store({decode(k): decode(v) for k, v in raw.items()})

    def _store(self, h: dict[str, str] | None = None) -> _Stored:
        return _Stored(self.keys, self._result_ttl_s, h or {})

    async def status(self, request_id: str) -> StatusInfo:
        return (await self._stored(request_id)).status(request_id)

    async def result(self, request_id: str, timeout: float | None = None) -> Result:
        """The answer, waiting for it if needed: BLPOP on the request's notify list, which every
        finish pushes to, in slices under the socket timeout; ``timeout`` in seconds.

        Raises ``ResultTimeout`` if it is still in flight when the timeout runs out.
        """
        end = None if timeout is None else time.monotonic() + timeout
        notify = self.keys.notify(request_id)
        while True:
            stored = await self._stored(request_id)
            answer = stored.result(request_id)
            if answer is not None:
                return answer
            left = wait_slice_s(end)
            if left <= 0:
                raise ResultTimeout(request_id, timeout or 0.0, stored.status(request_id).state)
            with store_errors(self.redis_url):
                popped = await self.redis.blpop([notify], timeout=max(left, 0.01))
                if popped is not None:  # put the wake-up back for other waiters
                    await self.redis.lpush(notify, popped[1])

    # -- cancelling ----------------------------------------------------------------------------

    async def cancel(self, request_id: str) -> State:
        """Cancel if not finished yet; returns the state the request ends up in."""
        keys, args = self._store().cancel_call(request_id, time.time())
        with store_errors(self.redis_url):
            out = await self.scripts["settle"](keys=keys, args=args)
        if not out:
            raise NotFound(request_id)
        return State.CANCELLED if int(out[0]) else State(decode(out[1]))
