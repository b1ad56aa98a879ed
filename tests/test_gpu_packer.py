"""The micro-batch packer: pure, so its rules are pinned by tables and checked by hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_worker.packer import Item, next_batch, pack, padded_tokens, padding_fraction

NOW = 1_000_000.0
BULK = NOW + 86_400
URGENT = NOW + 30


def items(*lengths: int, lane: str = "bulk", deadline: float = BULK, start: int = 0) -> list[Item]:
    return [Item(f"{lane}{start + i}", lane, deadline, n) for i, n in enumerate(lengths)]


def lengths_of(batches: list[list[Item]]) -> list[list[int]]:
    return [sorted(i.n_tokens for i in b) for b in batches]


@pytest.mark.parametrize(
    ("lengths", "budget", "size", "expected"),
    [
        pytest.param([], 100, 4, [], id="nothing waits"),
        pytest.param([8] * 10, 1000, 4, [[8] * 4, [8] * 4, [8] * 2], id="size binds"),
        pytest.param([100] * 7, 300, 64, [[100] * 3, [100] * 3, [100]], id="budget binds"),
        pytest.param([10, 100] * 4, 1000, 4, [[10] * 4, [100] * 4], id="lengths are bucketed"),
        pytest.param([500, 10], 100, 4, [[500], [10]], id="an input over the budget runs alone"),
        pytest.param([10, 19], 1000, 4, [[10], [19]], id="padding over 10 % splits"),
        pytest.param([10, 11], 1000, 4, [[10, 11]], id="padding under 10 % joins"),
        pytest.param(
            [3, 5, 4, 3, 5, 4], 15, 8, [[3, 3], [4, 5, 5], [4]], id="the fullest run that fits wins"
        ),
    ],
)
def test_pack_table(lengths: list[int], budget: int, size: int, expected: list[list[int]]) -> None:
    batches = pack(items(*lengths), max_batch_tokens=budget, max_batch_size=size, now=NOW)
    assert sorted(lengths_of(batches)) == sorted(expected)


def test_an_urgent_request_never_waits_behind_bulk_queued_before_it() -> None:
    bulk = items(*([40] * 50))
    urgent = items(7, 300, 40, lane="urgent", deadline=URGENT)
    batches = pack(bulk + urgent, max_batch_tokens=4096, max_batch_size=64, now=NOW)
    lanes = [{i.lane for i in b} for b in batches]
    first_bulk = next(k for k, seen in enumerate(lanes) if "bulk" in seen)
    assert all(lanes[k] == {"urgent"} for k in range(first_bulk))
    assert {i.id for b in batches[:first_bulk] for i in b} == {i.id for i in urgent}


def test_earliest_deadline_first_across_lanes() -> None:
    late = Item("late", "urgent", NOW + 500, 10)
    early = Item("early", "bulk", NOW + 10, 10)
    middle = Item("middle", "standard", NOW + 100, 10)
    batches = pack([late, middle, early], max_batch_tokens=100, max_batch_size=8, now=NOW)
    assert [[i.id for i in b] for b in batches] == [["early"], ["middle"], ["late"]]


def test_inputs_due_close_together_share_a_batch() -> None:
    """Within half the anchor's remaining time, deadlines do not split a batch."""
    a = Item("a", "standard", NOW + 100, 10)
    b = Item("b", "standard", NOW + 140, 10)
    assert pack([a, b], max_batch_tokens=100, max_batch_size=8, now=NOW) == [[a, b]]


def test_priority_breaks_deadline_ties() -> None:
    low = Item("low", "bulk", BULK, 10, priority=10)
    high = Item("high", "urgent", BULK, 10, priority=100)
    batches = pack([low, high], max_batch_tokens=100, max_batch_size=1, now=NOW)
    assert [b[0].id for b in batches] == ["high", "low"]


def test_a_late_anchor_still_runs_first() -> None:
    overdue = Item("overdue", "urgent", NOW - 60, 200)
    bulk = items(*([20] * 10))
    (first, *_) = pack([*bulk, overdue], max_batch_tokens=1000, max_batch_size=8, now=NOW)
    assert [i.id for i in first] == ["overdue"]


def test_next_batch_is_the_first_of_the_plan() -> None:
    pool = items(5, 9, 50, 51, 52, 7) + items(30, lane="urgent", deadline=URGENT)
    plan = pack(pool, max_batch_tokens=200, max_batch_size=3, now=NOW)
    assert next_batch(pool, max_batch_tokens=200, max_batch_size=3, now=NOW) == plan[0]
    assert next_batch([], max_batch_tokens=200, max_batch_size=3, now=NOW) == []


@pytest.mark.parametrize(
    ("batches", "padded", "fraction"),
    [
        ([], 0, 0.0),
        ([[10, 10]], 20, 0.0),
        ([[5, 10]], 20, 0.25),
        ([[5, 10], [4, 4, 4, 4]], 36, 5 / 36),
    ],
)
def test_padding_helpers(batches: list[list[int]], padded: int, fraction: float) -> None:
    assert sum(padded_tokens(b) for b in batches) == padded
    assert padding_fraction(batches) == pytest.approx(fraction)


@pytest.mark.parametrize(
    ("pool", "budget", "size", "message"),
    [
        (items(0), 100, 4, "n_tokens"),
        ([Item("x", "bulk", float("nan"), 3)], 100, 4, "NaN"),
        (items(3), 0, 4, "at least 1"),
        (items(3), 100, 0, "at least 1"),
    ],
)
def test_bad_arguments_are_refused(pool: list[Item], budget: int, size: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pack(pool, max_batch_tokens=budget, max_batch_size=size, now=NOW)


def edf_key(item: Item, position: dict[object, int]) -> tuple[float, int, int]:
    return (item.deadline, -item.priority, position[item.id])


item_lists = st.lists(
    st.tuples(
        st.integers(min_value=1, max_value=300),
        st.sampled_from(
            [(URGENT, "urgent", 100), (NOW + 3600, "standard", 50), (BULK, "bulk", 10)]
        ),
        st.floats(min_value=0, max_value=120),
    ),
    max_size=80,
).map(
    lambda rows: [
        Item(f"i{k}", lane, deadline + jitter, n, priority)
        for k, (n, (deadline, lane, priority), jitter) in enumerate(rows)
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    pool=item_lists,
    budget=st.integers(min_value=1, max_value=2000),
    size=st.integers(min_value=1, max_value=16),
    max_padding=st.sampled_from([0.0, 0.1, 0.3, 1.0]),
)
def test_pack_invariants(pool: list[Item], budget: int, size: int, max_padding: float) -> None:
    batches = pack(
        pool, max_batch_tokens=budget, max_batch_size=size, now=NOW, max_padding=max_padding
    )
    placed = [i.id for b in batches for i in b]
    assert sorted(map(str, placed)) == sorted(str(i.id) for i in pool), "every input exactly once"
    position = {item.id: k for k, item in enumerate(pool)}
    remaining = sorted(pool, key=lambda i: edf_key(i, position))
    for batch in batches:
        lengths = [i.n_tokens for i in batch]
        assert 1 <= len(batch) <= size
        if len(batch) > 1:
            assert padded_tokens(lengths) <= budget
            assert padding_fraction([lengths]) <= max_padding + 1e-9
        assert remaining[0] in batch, "the earliest deadline is always in the next batch"
        taken = {i.id for i in batch}
        remaining = [i for i in remaining if i.id not in taken]


@settings(max_examples=200, deadline=None)
@given(pool=item_lists, budget=st.integers(min_value=300, max_value=4000))
def test_urgent_inputs_all_run_before_any_bulk_input(pool: list[Item], budget: int) -> None:
    batches = pack(pool, max_batch_tokens=budget, max_batch_size=8, now=NOW)
    index = {i.id: k for k, b in enumerate(batches) for i in b}
    urgent = [index[i.id] for i in pool if i.lane == "urgent"]
    later = [index[i.id] for i in pool if i.lane != "urgent"]
    if urgent and later:
        assert max(urgent) < min(later)


def test_max_padding_is_a_share() -> None:
    with pytest.raises(ValueError, match="max_padding"):
        pack(items(3), max_batch_tokens=100, max_batch_size=4, now=NOW, max_padding=1.5)
