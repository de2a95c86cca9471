"""Stop requests (Ctrl-C, SIGTERM) that long loops honour even when Python drops the KeyboardInterrupt.

The command line's signal handler raises :class:`KeyboardInterrupt` wherever the main thread happens to be. When
that is inside a finaliser (a ``__del__`` run by garbage collection, such as PyTorch's for tensors shared by
DataLoader workers), Python prints "Exception ignored" and carries on, and the job would run to its end. So the
handler also records the request here, and the long loops (extraction batches, training steps, slides scored)
call :func:`check_stop` at points where stopping is safe.
"""

from __future__ import annotations

__all__ = ["check_stop", "clear_stop", "request_stop", "stop_signals"]

_signals: list[int] = []


def request_stop(signum: int) -> None:
    """Record that signal ``signum`` asked the job to stop (called from a signal handler)."""
    _signals.append(signum)


def stop_signals() -> list[int]:
    """The signals received since :func:`clear_stop`, in order."""
    return list(_signals)


def check_stop() -> None:
    """Raise :class:`KeyboardInterrupt` if a stop was requested (and its first interrupt was lost)."""
    if _signals:
        raise KeyboardInterrupt


def clear_stop() -> None:
    """Forget earlier requests (a new job starts)."""
    _signals.clear()
