"""What every granite-jax command does around its work: user mistakes as one line, clean termination."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from granite_jax.checkpoint.atomic import Terminated, terminate_cleanly

# A user mistake (bad path, file, argument or input): one line on stderr, exit status 1. Set
# GRANITE_JAX_DEBUG=1 for the traceback.
USER_ERRORS = (ValueError, TypeError, OSError)


def run_command(prog: str, fn: Callable[[], int]) -> int:
    """`fn()` with SIGTERM turned into a clean exit (temporaries removed, status 143) and user errors named."""
    try:
        with terminate_cleanly():
            return fn()
    except Terminated as e:
        print(f"{prog}: terminated", file=sys.stderr)
        return int(e.code)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if os.environ.get("GRANITE_JAX_DEBUG"):
            raise
        print(f"{prog}: error: {describe(e)}", file=sys.stderr)
        return 1


def describe(e: BaseException) -> str:
    """An exception as one line: OSErrors as 'strerror: filename', others as their message."""
    if isinstance(e, OSError) and e.strerror and e.filename:
        return f"{e.strerror}: {e.filename}"
    text = str(e) or type(e).__name__
    return text if "\n" not in text else text.replace("\n", " ")
