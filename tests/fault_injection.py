"""Faults that a test arms and one of the session Ray's worker processes fires, at a chosen point of its task.

Polling process titles for a short task (the parts layout's writer runs for a few milliseconds per block) and killing
what it finds is a race: on a slow or loaded machine the poll can miss every run, and the test then proves nothing
(seen in CI). Here the victim kills itself where the test asked:

- the session's ``ray.init`` installs :func:`install` as every worker's setup hook; it wraps
  ``cskd_ray.io.storage.write_bytes_once`` (the library's one way to write a whole object) and does nothing else;
- a test arms a fault with :func:`armed_fault`: a file naming a fragment of an object URI;
- the first worker that writes an object whose URI holds the fragment claims the fault by renaming the file (an
  atomic rename: exactly one process fires it), finishes the write, records its pid and the URI, and sends itself
  SIGKILL: it dies after its output reached storage and before its task returned, which is what a retried task's
  duplicate rows come from.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FAULTS_DIR_ENV = "CSKD_TEST_FAULTS_DIR"
ARMED = "armed.json"
FIRED = "fired.json"


def install() -> None:
    """Worker setup hook: wrap ``write_bytes_once`` so that an armed fault can fire (a no-op unless the session set
    ``CSKD_TEST_FAULTS_DIR``)."""
    directory = os.environ.get(FAULTS_DIR_ENV)
    if not directory:
        return
    from cskd_ray.io import storage

    write = storage.write_bytes_once

    def write_bytes_once(uri: str, data: bytes, *, overwrite: bool = False) -> bool:
        wrote = write(uri, data, overwrite=overwrite)
        _fire_if_armed(Path(directory), uri)
        return wrote

    storage.write_bytes_once = write_bytes_once


def _fire_if_armed(directory: Path, uri: str) -> None:
    armed = directory / ARMED
    if not armed.exists():
        return
    try:
        fragment = json.loads(armed.read_text())["fragment"]
    except (OSError, ValueError):  # claimed by another process meanwhile
        return
    if fragment not in uri:
        return
    claimed = directory / f"claimed-{os.getpid()}"
    try:
        armed.rename(claimed)
    except FileNotFoundError:
        return
    (directory / FIRED).write_text(json.dumps({"pid": os.getpid(), "uri": uri}))
    claimed.unlink()
    os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def armed_fault(uri_fragment: str) -> Iterator[Path]:
    """Arm a fault for the session's Ray workers; yield the file the firing worker fills with ``{"pid", "uri"}``.

    The file does not exist when no worker fired. The fault is disarmed on exit.
    """
    directory = Path(os.environ[FAULTS_DIR_ENV])
    fired = directory / FIRED
    fired.unlink(missing_ok=True)
    (directory / ARMED).write_text(json.dumps({"fragment": uri_fragment}))
    try:
        yield fired
    finally:
        (directory / ARMED).unlink(missing_ok=True)
