"""Turn SIGINT (Ctrl-C) and SIGTERM (``kill``, a scheduler, a session's end) into exceptions of our own, so that the
clean-up paths run (half-built output directories are removed, state files stay whole) and the CLI, not a library
in between, decides the exit status: click and typer catch ``KeyboardInterrupt`` themselves and turn it into a
return value that is easy to lose (it once made an interrupted ``ctrlab train`` exit 0)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM (a ``BaseException``, like
    ``KeyboardInterrupt``, so ``except Exception`` blocks do not swallow it)."""


class Interrupted(BaseException):
    """Raised in the main thread on SIGINT while :func:`signals_raise` is active. Deliberately not a
    ``KeyboardInterrupt``: typer would catch that and hand back exit code 130 as a plain return value."""


#: Exit statuses the shell gives a process ended by these signals (128 + signal number).
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(f"terminated by signal {signum}")


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(f"interrupted by signal {signum}")


@contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block, SIGINT raises :class:`Interrupted` and SIGTERM :class:`Terminated`; the previous handlers
    are restored on exit. Outside the main thread the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGINT, _raise_interrupted), (signal.SIGTERM, _raise_terminated))}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
        raise SystemExit(EXIT_TERMINATED) from None
