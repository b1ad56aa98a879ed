"""Request states as one enum, with the allowed transitions written as data.

Tasks and scripts never spell a state as a string of their own: the Lua scripts receive the
values from here (see ``routing.store.lanes``), so a renamed state cannot drift between Python and Lua.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    QUEUED = "queued"
    CLAIMED = "claimed"
    SUBMITTED = "submitted"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    DELIVERED = "delivered"


#: A request holding a lease: if the lease runs out, the sweeper puts it back in its lane.
LEASED = frozenset({State.CLAIMED, State.RUNNING})

#: States in which a provider batch may still answer a request: SUBMITTED, or CLAIMED while the
#: worker that staged it in its group has not yet marked it SUBMITTED (a flusher may take the
#: group inside that window, and must not drop the request from the batch it builds).
BATCH_HELD = frozenset({State.CLAIMED, State.SUBMITTED})

#: The outcome is known; what is left is delivery.
FINISHED = frozenset({State.DONE, State.FAILED, State.EXPIRED, State.CANCELLED})

#: Nothing more will happen to the request.
TERMINAL = frozenset({State.DELIVERED})

#: Outcomes a caller can see in a result (DELIVERED keeps the outcome it had).
OUTCOMES = FINISHED

TRANSITIONS: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.CLAIMED, State.EXPIRED, State.CANCELLED}),
    State.CLAIMED: frozenset(
        {State.SUBMITTED, State.RUNNING, State.QUEUED, State.DONE, State.FAILED, State.CANCELLED}
    ),
    State.SUBMITTED: frozenset({State.DONE, State.FAILED, State.QUEUED, State.CANCELLED}),
    State.RUNNING: frozenset({State.DONE, State.FAILED, State.QUEUED, State.CANCELLED}),
    State.DONE: frozenset({State.DELIVERED}),
    State.FAILED: frozenset({State.DELIVERED}),
    State.EXPIRED: frozenset({State.DELIVERED}),
    State.CANCELLED: frozenset({State.DELIVERED}),
    State.DELIVERED: frozenset(),
}


def can_transition(src: State, dst: State) -> bool:
    return dst in TRANSITIONS[src]
