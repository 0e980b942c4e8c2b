"""Progress display: a tqdm bar with rate and ETA on a terminal, periodic log lines otherwise.

Only the main process shows anything; other ranks get a silent :class:`Progress`.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["Progress", "format_duration"]


def format_duration(seconds: float) -> str:
    """``75.2`` -> ``"1m15s"``, ``3700`` -> ``"1h01m"``."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
    """Counts steps of one loop.

    Args:
        total: steps of the loop.
        desc: label (``"epoch 3/10"``).
        enabled: show anything at all (False on ranks other than 0).
        initial: steps already done (resume).
        log_every: without a terminal, print a line every this many steps (and at least every
            60 seconds).
        stream: where to print (default: stderr for the bar, stdout for lines).
        bar: force the tqdm bar on (True) or off (False); default: when ``stream`` is a TTY.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        enabled: bool = True,
        initial: int = 0,
        log_every: int = 50,
        stream: TextIO | None = None,
        bar: bool | None = None,
    ) -> None:
        self.total, self.desc, self.enabled = total, desc, enabled
        self.n = self.start_n = initial
        self.log_every = log_every
        self.t0 = self.t_last = time.monotonic()
        self.postfix: dict[str, Any] = {}
        self._bar: Any = None
        use_bar = bar if bar is not None else (stream or sys.stderr).isatty()
        self.stream = stream or (sys.stderr if use_bar else sys.stdout)
        if enabled and use_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=initial, desc=desc, file=self.stream, dynamic_ncols=True
            )

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advances by ``n`` steps; ``postfix`` values are shown next to the count."""
        self.n += n
        self.postfix.update(postfix)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(
                    {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()},
                    refresh=False,
                )
            return
        now = time.monotonic()
        if (self.n - self.start_n) % self.log_every == 0 or now - self.t_last >= 60:
            self.t_last = now
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        """``epoch 1/5 120/469 loss 0.51 | 3.2 it/s, eta 1m49s``."""
        done = self.n - self.start_n
        elapsed = time.monotonic() - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else 0.0
        post = " ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.postfix.items()
        )
        return (
            f"{self.desc} {self.n}/{self.total} {post} | {rate:.2f} it/s, "
            f"eta {format_duration(eta)}"
        )

    def close(self) -> None:
        """Ends the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
