"""Drop-ins for OpenAI and Anthropic SDK code: change the import, keep the calls.

    from routing.dropin import OpenAI                  # was: from openai import OpenAI

    client = OpenAI(lane="bulk", deadline="6h")
    completion = client.chat.completions.create(model="gpt-4o-mini", messages=[...])
    print(completion.choices[0].message.content)       # the SDK's own ChatCompletion

Each call is one mixbatch request, in the client's lane with its deadline, answered by whichever
route is cheapest in time (a provider batch, the local GPU worker, the realtime endpoint) and
returned as the SDK's own typed object, validated from the answer's body. A request that fails
raises the SDK's own error for its status (``BadRequestError``, ``RateLimitError``, ...), built
as the SDK builds them, so ``except openai.APIStatusError`` code keeps working.

Per call, ``extra_body={"mixbatch": {"lane": ..., "deadline": ..., "custom_id": ...}}``
overrides the defaults; a ``custom_id`` makes the call idempotent (calling again returns the
first request's answer). The ``openai`` and ``anthropic`` packages stay optional
(``pip install 'mixbatch[dropin]'``): only this module imports them, the one a class needs,
when it is built. What a call does, whichever the SDK (the request, the answer, the errors), is
``routing.dropin_core``; this module is the four clients.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from routing.async_client import AsyncClient
from routing.client import Client
from routing.dropin_core import ANTHROPIC, OPENAI, Call, Endpoint, Sdk

if TYPE_CHECKING:
    from datetime import datetime, timedelta

    from anthropic.types import Message
    from openai.types import CreateEmbeddingResponse
    from openai.types.chat import ChatCompletion
    from openai.types.responses import Response

__all__ = ["Anthropic", "AsyncAnthropic", "AsyncOpenAI", "OpenAI"]

T = TypeVar("T")
C = TypeVar("C", Client, AsyncClient)

CHAT: Endpoint[ChatCompletion] = Endpoint(
    OPENAI,
    "/v1/chat/completions",
    "resources.chat.completions:Completions",
    "types.chat:ChatCompletion",
)
EMBEDDINGS: Endpoint[CreateEmbeddingResponse] = Endpoint(
    OPENAI, "/v1/embeddings", "resources.embeddings:Embeddings", "types:CreateEmbeddingResponse"
)
RESPONSES: Endpoint[Response] = Endpoint(
    OPENAI, "/v1/responses", "resources.responses:Responses", "types.responses:Response"
)
MESSAGES: Endpoint[Message] = Endpoint(
    ANTHROPIC, "/v1/messages", "resources.messages:Messages", "types:Message"
)


class _Dropin(Generic[C]):
    """What every drop-in holds: its defaults (``Call``) and the mixbatch client it submits to.

    ``lane`` and ``deadline`` are the defaults of every call; ``tenant`` the tenant its
    requests are submitted as (else the mixbatch client's); ``client`` the mixbatch client to
    use (else one on ``redis_url``, or found as ``Client()`` finds it); ``timeout`` how long a
    call waits for its answer (None: until it comes; the request is never dropped, so a call
    that timed out can be made again with the same ``custom_id`` to pick up its answer).
    """

    _sdk: ClassVar[Sdk]
    _client_type: ClassVar[type[Client] | type[AsyncClient]]

    def __init__(
        self,
        *,
        lane: str,
        deadline: datetime | float | str | timedelta | None = None,
        tenant: str | None = None,
        client: C | None = None,
        redis_url: str | None = None,
        namespace: str | None = None,
        timeout: float | None = None,
    ) -> None:
        self._calls = Call(self._sdk, lane=lane, deadline=deadline, tenant=tenant, timeout=timeout)
        self._owned = client is None
        built: Any = client or self._client_type(redis_url, namespace=namespace)
        self.mixbatch: C = built


class _SyncDropin(_Dropin[Client]):
    _client_type = Client

    def _call(self, endpoint: Endpoint[T], params: dict[str, Any]) -> T:
        plan = self._calls.plan(endpoint, params)
        with self._calls.errors(plan):
            ticket = self.mixbatch.submit(**plan.fields)
            result = self.mixbatch.result(ticket.id, timeout=plan.wait_s)
        return self._calls.answer(plan, result)

    def close(self) -> None:
        """Close the mixbatch client if this drop-in built it."""
        if self._owned:
            self.mixbatch.close()

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _AsyncDropin(_Dropin[AsyncClient]):
    _client_type = AsyncClient

    async def _call(self, endpoint: Endpoint[T], params: dict[str, Any]) -> T:
        plan = self._calls.plan(endpoint, params)
        with self._calls.errors(plan):
            ticket = await self.mixbatch.submit(**plan.fields)
            result = await self.mixbatch.result(ticket.id, timeout=plan.wait_s)
        return self._calls.answer(plan, result)

    async def close(self) -> None:
        """Close the mixbatch client if this drop-in built it (``close``, as the SDK names it)."""
        if self._owned:
            await self.mixbatch.aclose()

    async def __aenter__(self: T) -> T:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Create(Generic[T]):
    """An SDK resource: ``create(**params)`` with the SDK's own arguments, the answer returned."""

    def __init__(self, owner: _SyncDropin, endpoint: Endpoint[T]) -> None:
        self._owner, self._endpoint = owner, endpoint

    def create(self, **params: Any) -> T:
        return self._owner._call(self._endpoint, params)


class AsyncCreate(Generic[T]):
    """An SDK resource of an async client: ``await create(**params)``."""

    def __init__(self, owner: _AsyncDropin, endpoint: Endpoint[T]) -> None:
        self._owner, self._endpoint = owner, endpoint

    async def create(self, **params: Any) -> T:
        return await self._owner._call(self._endpoint, params)


class Chat(Generic[T]):
    """``client.chat``, holding ``completions`` as in the SDK."""

    def __init__(self, completions: T) -> None:
        self.completions = completions


class OpenAI(_SyncDropin):
    """``openai.OpenAI`` through mixbatch: ``chat.completions``, ``embeddings``, ``responses``."""

    _sdk = OPENAI

    @cached_property
    def chat(self) -> Chat[Create[ChatCompletion]]:
        return Chat(Create(self, CHAT))

    @cached_property
    def embeddings(self) -> Create[CreateEmbeddingResponse]:
        return Create(self, EMBEDDINGS)

    @cached_property
    def responses(self) -> Create[Response]:
        return Create(self, RESPONSES)


class AsyncOpenAI(_AsyncDropin):
    """``openai.AsyncOpenAI`` through mixbatch, on an ``AsyncClient``: ``OpenAI``, awaited."""

    _sdk = OPENAI

    @cached_property
    def chat(self) -> Chat[AsyncCreate[ChatCompletion]]:
        return Chat(AsyncCreate(self, CHAT))

    @cached_property
    def embeddings(self) -> AsyncCreate[CreateEmbeddingResponse]:
        return AsyncCreate(self, EMBEDDINGS)

    @cached_property
    def responses(self) -> AsyncCreate[Response]:
        return AsyncCreate(self, RESPONSES)


class Anthropic(_SyncDropin):
    """``anthropic.Anthropic`` through mixbatch: ``messages.create``."""

    _sdk = ANTHROPIC

    @cached_property
    def messages(self) -> Create[Message]:
        return Create(self, MESSAGES)


class AsyncAnthropic(_AsyncDropin):
    """``anthropic.AsyncAnthropic`` through mixbatch, on an ``AsyncClient``: awaited."""

    _sdk = ANTHROPIC

    @cached_property
    def messages(self) -> AsyncCreate[Message]:
        return AsyncCreate(self, MESSAGES)
