"""The one exception type for a user's mistake (bad input, bad flag, missing file, a resource the
configuration needs and the machine lacks).

The CLI prints its message as one line and exits 2, without a traceback, also when it was raised
inside a Ray task, actor or Train worker (:func:`find_raysd_error` unwraps it). Anything else
that escapes is a bug in raysd and keeps its traceback.
"""

from __future__ import annotations

import re


class RaysdError(Exception):
    """A user-facing error: the message names what is wrong, where, the rule and the fix."""


# How a RaysdError raised in another process survives in Ray's error text (an actor's creation
# task, a Ray Data operator, a Train worker): "...raysd.errors.RaysdError: <the message>".
_IN_TEXT = re.compile(r"(?:raysd\.errors\.)?RaysdError: (?P<msg>[^\n]+)")


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception behind it: causes, contexts, Ray's wrappers, Train's worker failures."""
    seen: set[int] = set()
    out: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        # RayTaskError keeps the original as .cause; Train/Tune wrap errors in chains.
        todo += [getattr(e, "cause", None) if isinstance(getattr(e, "cause", None), BaseException) else None,
                 e.__cause__, e.__context__]
        for attr in ("worker_failures", "errors"):
            inner = getattr(e, attr, None)
            if isinstance(inner, dict):
                todo += [v for v in inner.values() if isinstance(v, BaseException)]
            elif isinstance(inner, (list, tuple)):
                todo += [v for v in inner if isinstance(v, BaseException)]
    return out


def find_raysd_error(exc: BaseException) -> RaysdError | None:
    """Return the RaysdError behind ``exc`` (also through Ray task/actor/train wrappers, and,
    where Ray kept only the text of it, rebuilt from that text)."""
    chain = _chain(exc)
    for e in chain:
        if isinstance(e, RaysdError):
            return e
    for e in chain:
        found = _IN_TEXT.findall(str(e))
        if found:
            return RaysdError(found[-1].strip())
    return None


_OOM = ("running low on memory", "OutOfMemoryError", "out of memory", "Cannot allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Ray's memory monitor killing a worker, a CUDA out-of-memory error, or an allocation failure."""
    return any(type(e).__name__ in ("OutOfMemoryError", "MemoryError") or any(m in str(e) for m in _OOM)
               for e in _chain(exc))
