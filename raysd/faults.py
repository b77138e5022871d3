"""Fault injection for the fault-tolerance tests (off unless the environment asks for it).

``maybe_pause`` (below) holds a process at a named point until the test lets it go.

``RAYSD_FAULT=<point>`` with ``RAYSD_FAULT_MARKER=<path>`` makes the first arrival at the
named point fail once: the marker file records that the fault fired, so retries and reruns
proceed. ``RAYSD_FAULT_MODE`` is ``raise`` (an exception, the default) or ``exit`` (the process
dies at once, as a killed actor or worker would).
"""

from __future__ import annotations

import os


def maybe_fail(point: str) -> None:
    if os.environ.get("RAYSD_FAULT") != point:
        return
    marker = os.environ.get("RAYSD_FAULT_MARKER")
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # only the first arrival fires
    except FileExistsError:
        return
    os.write(fd, f"{point} {os.getpid()}\n".encode())
    os.close(fd)
    if os.environ.get("RAYSD_FAULT_MODE", "raise") == "exit":
        os._exit(17)
    raise RuntimeError(f"injected fault at {point} (RAYSD_FAULT)")


def maybe_pause(point: str) -> None:
    """``RAYSD_PAUSE=<point>`` with ``RAYSD_PAUSE_DIR=<dir>``: at the named point, write
    ``<dir>/<point>.<pid>.reached`` and wait until ``<dir>/<point>.go`` exists (the fault tests use
    it to interleave two processes at a chosen step, not by timing)."""
    if os.environ.get("RAYSD_PAUSE") != point:
        return
    folder = os.environ.get("RAYSD_PAUSE_DIR")
    if not folder:
        return
    import time

    with open(os.path.join(folder, f"{point}.{os.getpid()}.reached"), "w"):
        pass
    while not os.path.exists(os.path.join(folder, f"{point}.go")):
        time.sleep(0.02)
