"""A progress line on stderr for long work (tqdm when installed)."""

from __future__ import annotations

import sys
import time


class Progress:
    """``update(n)`` as work is done, ``note(text)`` for a status (loss, lr, ...),
    ``close()`` at the end."""

    def __init__(
        self, total: int, unit: str = "rows", enabled: bool = True, desc: str = ""
    ) -> None:
        self.total, self.unit, self.done, self.enabled = total, unit, 0, enabled
        self.desc = desc
        self.status = ""
        self.start = time.perf_counter()
        self.last = 0.0
        self.bar = None
        # Not a terminal (a log file, CI): a plain line now and then instead of redraws.
        self.tty = sys.stderr.isatty()
        if enabled and self.tty:
            try:
                from tqdm import tqdm  # type: ignore[import-untyped]

                self.bar = tqdm(total=total, unit=unit, file=sys.stderr, desc=desc or None)
            except ImportError:
                pass

    def note(self, text: str) -> None:
        """A status shown after the counts."""
        self.status = text
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        every = 0.1 if self.tty else 10.0
        if now - self.last < every and self.done < self.total:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        head = f"{self.desc}: " if self.desc else ""
        tail = f" {self.status}" if self.status else ""
        line = (
            f"{head}[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
            f"{self.unit} ({rate:.1f}/s){tail}"
        )
        if self.tty:
            print(f"\r{line}\033[K", end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            self.last = -1e9
            self.update(0)
            if self.tty:
                print(file=sys.stderr)
