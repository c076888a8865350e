"""Helpers shared by cimstat's command-line entry points."""
from __future__ import annotations

import sys
from typing import Callable

from cimstat.errors import CimstatError


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run ``main(argv)``; a :class:`CimstatError` becomes one line on stderr and exit code 2."""
    try:
        code = main(argv)
    except CimstatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)
