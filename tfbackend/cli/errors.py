"""Turn user-facing errors into one line on stderr and exit code 2 (tracebacks only with --debug)."""

from __future__ import annotations

import contextlib
import os
import sys

import typer

from tfbackend.errors import FollowerExit, UserError

EXIT_BAD_INPUT = 2


@contextlib.contextmanager
def user_errors(debug: bool = False):
    try:
        yield
    except UserError as exc:
        if debug or os.environ.get("TFBACKEND_DEBUG"):
            raise
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except FollowerExit as exc:  # rank 0 of a torchrun job says it all, once
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - the last line of defence: still one line, exit 2
        if debug or os.environ.get("TFBACKEND_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        typer.echo(
            f"error: unexpected {type(exc).__name__}: {first} (rerun with --debug for the traceback)",
            err=True,
        )
        raise typer.Exit(EXIT_BAD_INPUT) from None


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    sys.exit(EXIT_BAD_INPUT)
