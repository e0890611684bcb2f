"""What the benchmark scripts share."""

from __future__ import annotations

import signal
import sys


def exit_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C: `with TemporaryDirectory()` then removes the script's checkpoints (up to
    26 GB for `bench_generate.py`), and a worker that `subprocess.run` is waiting on is killed."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
