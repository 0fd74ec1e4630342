"""Turn user-facing errors into one line on stderr and their exit code. `--debug` (or
TFBACKEND_DEBUG=1) adds the traceback above that line and changes nothing else."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback

import typer

from tfbackend.errors import FollowerExit, Terminated, UserError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def debugging(debug: bool = False) -> bool:
    return debug or os.environ.get("TFBACKEND_DEBUG", "") not in ("", "0")


@contextlib.contextmanager
def user_errors(debug: bool = False, subject: str | None = None):
    """`subject` (e.g. "checking ./model") names the input in an unexpected error's line."""
    try:
        yield
    except UserError as exc:
        _exit(f"error: {exc}", exc.exit_code, debug)
    except FollowerExit as exc:  # rank 0 of a torchrun job says it all, once
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        _exit("interrupted", EXIT_INTERRUPTED, debug)
    except Terminated as exc:
        _exit("terminated", exc.exit_code, debug)
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - the last line of defence: still one line, exit 2
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        where = f" while {subject}" if subject else ""
        hint = "" if debugging(debug) else " (rerun with --debug for the traceback)"
        _exit(
            f"error: unexpected {type(exc).__name__}{where}: {first}{hint}", EXIT_BAD_INPUT, debug
        )


def _exit(line: str, code: int, debug: bool):
    if debugging(debug):
        traceback.print_exc(file=sys.stderr)
    typer.echo(line, err=True)
    raise typer.Exit(code) from None


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    sys.exit(EXIT_BAD_INPUT)
