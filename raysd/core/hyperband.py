"""Synchronous HyperBand without Ray: which bracket each trial belongs to and the successive-halving
decisions at the rungs, as plain data that survives a restore (Li et al., JMLR 2018).

With maximum budget ``R`` (classifier epochs) and reduction factor ``eta``, ``s_max = floor(log_eta
R)`` and bracket ``s`` (``s_max`` .. 0, the most aggressive first) starts ``n_s = ceil((s_max + 1) /
(s + 1) * eta**s)`` trials; its members meet at the rungs ``round(R * eta**(i - s))``, i = 0 .. s-1,
where the best ``max(1, arrived // eta)`` (by the metric at that rung) go on and the others are cut;
survivors of the last rung run the whole budget. Fewer trials than a whole band (``sum n_s``) are
spread over the brackets in proportion (largest remainder), so every bracket keeps its share of the
search; more make several bands.

Trials are assigned to brackets by the order in which they were suggested (``index``), so a restored
search puts every trial back in its bracket whatever order the trials come back in. A rung's
decision waits until every member of the bracket has reached it or ended (its own early stopping,
an error, a cut at an earlier rung): waiting members are paused, holding no resources, so the
decision never depends on how many trials can run at once, and no bracket waits for a trial that
will not come.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Bracket:
    number: int  # position in the plan
    s: int
    first: int  # index of its first trial
    size: int
    rungs: tuple[int, ...]  # epochs (< max_t) where its members meet

    def members(self) -> range:
        return range(self.first, self.first + self.size)


def _shares(total: int, weights: list[int]) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainder, earlier ones win ties)."""
    raw = [total * w / sum(weights) for w in weights]
    out = [int(math.floor(r)) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: (-(raw[i] - out[i]), i))[: total - sum(out)]:
        out[i] += 1
    return out


def band(max_t: int, eta: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """(s, n_s, rungs) of one HyperBand band, the most aggressive bracket first."""
    s_max = int(math.floor(math.log(max_t) / math.log(eta) + 1e-9))
    out = []
    for s in range(s_max, -1, -1):
        n = int(math.ceil((s_max + 1) / (s + 1) * eta**s))
        rungs = tuple(sorted({max(1, int(round(max_t * eta ** (i - s)))) for i in range(s)} - {max_t}))
        out.append((s, n, rungs))
    return out


def plan(num_trials: int, max_t: int, eta: int) -> list[Bracket]:
    """The brackets of a search of ``num_trials`` trials (empty brackets dropped)."""
    one = band(max_t, eta)
    per_band = sum(n for _, n, _ in one)
    sizes: list[tuple[int, int, tuple[int, ...]]] = []
    left = num_trials
    while left >= per_band:
        sizes += one
        left -= per_band
    if left:
        sizes += [(s, n, r) for (s, _, r), n in zip(one, _shares(left, [n for _, n, _ in one]))]
    out, first = [], 0
    for s, n, rungs in sizes:
        if n > 0:
            out.append(Bracket(len(out), s, first, n, rungs))
            first += n
    return out


def milestones(max_t: int, eta: int) -> set[int]:
    """Every rung epoch of a band."""
    return {r for _, _, rungs in band(max_t, eta) for r in rungs}


@dataclass
class HyperBandState:
    """Where every trial of a search stands: plain data (pickled with the searcher's state, so it is
    saved with the trials it describes). Trials are known by their suggestion index."""

    brackets: list[Bracket]
    eta: int
    arrivals: dict[tuple[int, int], dict[int, float]] = field(default_factory=dict)  # (bracket, rung) -> values
    kept: dict[tuple[int, int], list[int]] = field(default_factory=dict)  # decided rungs: who goes on
    ended: set[int] = field(default_factory=set)  # finished, errored or cut
    cut: set[int] = field(default_factory=set)
    known: set[int] = field(default_factory=set)  # suggested so far

    def bracket_of(self, index: int) -> Bracket:
        for b in self.brackets:
            if index in b.members():
                return b
        raise ValueError(f"trial index {index} is outside the search's {self.brackets[-1].first + self.brackets[-1].size} "
                         "trials")

    def is_rung(self, index: int, epoch: int) -> bool:
        return epoch in self.bracket_of(index).rungs

    def decision(self, index: int, rung: int) -> str | None:
        """'continue' or 'stop' once the rung is decided; None while it waits."""
        kept = self.kept.get((self.bracket_of(index).number, rung))
        if kept is None:
            return None
        return "continue" if index in kept else "stop"

    def waiting(self) -> set[int]:
        """Trials that reached a rung whose decision is still open."""
        return {i for (b, r), got in self.arrivals.items() if (b, r) not in self.kept for i in got} - self.ended

    def arrive(self, index: int, rung: int, value: float) -> tuple[str, list[int], list[int]]:
        """A trial reports at a rung: (its decision: 'continue', 'stop' or 'wait'; indices promoted
        and cut by the rungs this arrival settled). A repeated arrival (a resumed trial reporting
        its checkpoint again) changes nothing."""
        self.known.add(index)
        b = self.bracket_of(index)
        if self.decision(index, rung) is None:
            self.arrivals.setdefault((b.number, rung), {}).setdefault(index, float(value))
        promoted, cut = self.settle(b.number)
        return self.decision(index, rung) or "wait", promoted, cut

    def end(self, index: int) -> tuple[list[int], list[int]]:
        """A trial ended (its own stop, an error, a cut): rungs it no longer blocks may settle."""
        self.known.add(index)
        self.ended.add(index)
        return self.settle(self.bracket_of(index).number)

    def settle(self, number: int) -> tuple[list[int], list[int]]:
        """Decide every rung of bracket ``number`` whose members have all arrived or ended."""
        b = self.brackets[number]
        promoted: list[int] = []
        cut: list[int] = []
        for rung in b.rungs:
            key = (number, rung)
            if key in self.kept:
                continue
            got = self.arrivals.get(key, {})
            if any(i not in got and i not in self.ended for i in b.members()):
                break  # someone may still come (not suggested yet, or running towards this rung)
            ranked = sorted(got, key=lambda i: (-got[i], i))
            keep = ranked[: max(1, len(ranked) // self.eta)] if ranked else []
            self.kept[key] = keep
            promoted += keep
            for i in ranked[len(keep):]:
                self.cut.add(i)
                self.ended.add(i)
                cut.append(i)
        return promoted, cut
