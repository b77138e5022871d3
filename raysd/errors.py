"""The one exception type for a user's mistake (bad input, bad flag, missing file).

The CLI prints its message as one line and exits non-zero, without a traceback. Anything
else that escapes is a bug in raysd and keeps its traceback.
"""

from __future__ import annotations


class RaysdError(Exception):
    """A user-facing error: the message names what is wrong, where, the rule and the fix."""


def find_raysd_error(exc: BaseException) -> RaysdError | None:
    """Return the RaysdError behind ``exc`` (also through Ray task/actor/train wrappers)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RaysdError):
            return e
        # RayTaskError keeps the original as .cause; Train/Tune wrap errors in chains.
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
        for attr in ("worker_failures", "errors"):
            inner = getattr(e, attr, None)
            if isinstance(inner, dict):
                todo += [v for v in inner.values() if isinstance(v, BaseException)]
            elif isinstance(inner, (list, tuple)):
                todo += [v for v in inner if isinstance(v, BaseException)]
    return None
