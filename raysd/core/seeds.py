"""Seeds derived from the run seed: every random draw of raysd comes from one of these."""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any mix of ints and strings, stable across processes and machines.

    ``derive_seed(run_seed, sample_id)`` is sample i's generation seed (its initial noise);
    training and classifier streams add their names, e.g. ``derive_seed(seed, "encoder", "order", epoch)``.
    """
    ints = [p if isinstance(p, int) else int.from_bytes(str(p).encode()[:8].ljust(8, b"\0"), "little") for p in parts]
    state = np.random.SeedSequence(ints).generate_state(2, np.uint32)
    return ((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)
