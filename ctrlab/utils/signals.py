"""Turn a termination request (SIGTERM: ``kill``, a scheduler, a session's end) into an exception, so that the
clean-up paths that run on Ctrl-C also run then: half-built output directories are removed, state files stay whole."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM (a ``BaseException``, like
    ``KeyboardInterrupt``, so ``except Exception`` blocks do not swallow it)."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(f"terminated by signal {signum}")


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated`; the previous handler is restored on exit.

    Outside the main thread (where Python cannot install handlers) the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_terminable(main: Callable[[], object], message: str) -> None:
    """Run a script's ``main`` with SIGTERM raising :class:`Terminated`; on termination print ``message`` (one line,
    no traceback) and exit with 143, the shell's code for a SIGTERM-ended process."""
    try:
        with sigterm_raises():
            main()
    except Terminated:
        print(message)
        raise SystemExit(143) from None
