"""Entry point shared by every experiment: parse flags, run, map errors to exit codes.

Exit status: 0 on success, 2 on bad input (one ``error: ...`` line on stderr,
no traceback, nothing in the workdir touched), 1 on other failures.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from jaxtrain.config import TrainConfig, parse_config

# Errors that mean "the input was bad": reported in one line, exit status 2.
USAGE_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


def run(
    config_type: type[TrainConfig],
    defaults: TrainConfig,
    argv: Sequence[str] | None,
    *,
    prog: str,
    body: Callable[[Any], Any] | None = None,
) -> int:
    """Parses ``argv`` into a config and calls ``body(config)`` (default: train_and_evaluate)."""
    try:
        config = parse_config(config_type, defaults, argv, prog)
        if body is None:
            from jaxtrain.loop import train_and_evaluate

            body = train_and_evaluate
        body(config)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except USAGE_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main_guard(code: int) -> None:
    """``sys.exit(code)`` for ``if __name__ == "__main__"`` blocks."""
    sys.exit(code)
