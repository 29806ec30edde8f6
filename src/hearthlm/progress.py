"""Progress bars for slow steps (model load, quantize, perplexity): tqdm on stderr, or nothing.

`progress` arguments take True (show now), False (never) or None (auto: only on a terminal's stderr, only on the
main thread -- the server loads and steps on worker threads, so its request paths stay quiet -- and only once
the step has run for DELAY_S, so fast loads and library calls print nothing). Tests drive bars with True and
read stderr.
"""
from __future__ import annotations

import sys
import threading
from typing import Any

DELAY_S = 1.0  # "progress bars for anything slower than a second"


class _Off:
    """A bar that shows nothing (tqdm's interface, the calls we use)."""

    n = 0
    total: int | None = None

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Off:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def wanted(progress: bool | None) -> bool:
    """Whether a bar may show: True/False as given; None = stderr is a terminal and this is the main thread."""
    if progress is not None:
        return bool(progress)
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty()) and threading.current_thread() is threading.main_thread()


def bar(total: int | None, desc: str, unit: str = "it", progress: bool | None = None, **kwargs: Any):
    """A tqdm bar on stderr (closed by `with` or .close()), or a silent stand-in when `wanted(progress)` is False.
    Auto bars appear only after DELAY_S; an explicit True shows at once."""
    if not wanted(progress):
        return _Off()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True,
                delay=0 if progress else DELAY_S, **kwargs)
