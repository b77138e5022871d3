"""Synchronous HyperBand's plan and decisions (raysd.core.hyperband), without Ray: the paper's brackets
shared out over fewer trials, and decisions that do not depend on the order trials arrive in, on how
many run at once, or on trials that end before a rung."""

import random

import pytest

from raysd.core import hyperband as hb


def test_shares_of_a_band_and_several_bands():
    assert [b.size for b in hb.plan(143, 100, 3)] == [81, 34, 15, 8, 5]  # one whole band
    assert [b.size for b in hb.plan(50, 100, 3)] == [28, 12, 5, 3, 2]
    assert sum(b.size for b in hb.plan(300, 100, 3)) == 300 and len(hb.plan(300, 100, 3)) == 15  # 2 bands + shares
    assert [(b.size, b.rungs) for b in hb.plan(4, 10, 3)] == [(2, (1, 3)), (1, (3,)), (1, ())]  # the demo
    firsts = [b.first for b in hb.plan(50, 100, 3)]
    assert firsts == [0, 28, 40, 45, 48]
    assert hb.milestones(100, 3) == {1, 4, 11, 33}


def simulate(values: dict[int, list[float]], plan: list[hb.Bracket], order_seed: int, ends: dict[int, int]):
    """Trials advance in a shuffled interleaving; ``values[i][k]`` is trial i's metric at its k-th
    rung; a trial in ``ends`` ends on its own before rung ``ends[i]``. Returns (cut, reached rungs)."""
    state = hb.HyperBandState(plan, 3)
    rng = random.Random(order_seed)
    pos = {i: 0 for b in plan for i in b.members()}  # next rung index
    live = set(pos)
    reached: dict[int, int] = {}
    while live:
        i = rng.choice(sorted(live))
        b = state.bracket_of(i)
        k = pos[i]
        if k < len(b.rungs) and state.decision(i, b.rungs[k]) is None and i in state.waiting():
            if all(j in state.waiting() or j in state.ended for j in live):
                pytest.fail(f"deadlock: {sorted(live)} all wait")
            continue  # it waits at its rung
        if k < len(b.rungs) and state.decision(i, b.rungs[k]) == "continue":
            pos[i] = k = k + 1
        if i in ends and ends[i] <= k:
            state.end(i)
            live.discard(i)
            continue
        if k >= len(b.rungs):  # past the last rung: runs its budget
            state.end(i)
            reached[i] = len(b.rungs)
            live.discard(i)
            continue
        decision, _, cut = state.arrive(i, b.rungs[k], values[i][k])
        for j in cut:
            live.discard(j)
        if decision == "stop":
            live.discard(i)
        elif decision == "continue":
            pos[i] = k + 1
    return state.cut, reached


def test_decisions_do_not_depend_on_the_order_of_arrival():
    plan = hb.plan(50, 100, 3)
    rng = random.Random(0)
    values = {i: [rng.random() for _ in range(4)] for b in plan for i in b.members()}
    ends = {3: 1, 30: 2, 41: 0}  # ended on their own: before rung 1, rung 2, at once
    results = {simulate(values, plan, seed, ends)[0].__repr__() for seed in range(12)}
    assert len(results) == 1  # twelve interleavings (1 at a time or all at once), one outcome
    cut, reached = simulate(values, plan, 0, ends)
    b0 = plan[0]
    survivors = [i for i, k in reached.items() if i in b0.members()]
    assert len(survivors) == 1  # 28 -> 9 -> 3 -> 1 -> the whole budget
    assert all(i in cut or i in survivors or i in ends for i in b0.members())


def test_a_bracket_whose_members_all_end_early_still_decides():
    plan = hb.plan(4, 10, 3)  # the demo's: a bracket of 2 with rungs 1 and 3
    state = hb.HyperBandState(plan, 3)
    assert state.arrive(0, 1, 0.5)[0] == "wait"  # trial 1 waits for trial 2
    promoted, cut = state.end(1)  # trial 2 ended (an error, or its own early stop) before rung 1
    assert promoted == [0] and cut == [] and state.decision(0, 1) == "continue"
    assert state.arrive(0, 3, 0.6)[0] == "continue"  # alone at rung 3: nobody to wait for
    assert state.arrive(0, 1, 0.5)[0] == "continue"  # a resumed trial reporting again changes nothing
