"""The typer app. Each command lives in its own module and imports the heavy parts lazily."""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup

from tfbackend import __version__

try:  # typer 0.2x vendors click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer depends on click itself
    from click import exceptions as click_errors
try:  # typer 0.29 keeps Abort in its own exceptions, not in the vendored click's
    from typer.exceptions import Abort
except ImportError:  # pragma: no cover - click's
    Abort = getattr(click_errors, "Abort", ())


class OneLineErrors(TyperGroup):
    """Usage errors as one line saying what to do, exit 2: click prints four (Usage, Try, a blank
    line, Error). Runs the command with `standalone_mode=False`, so click raises instead of
    printing; `--help` and `--version` still print and exit 0."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as exc:  # bare `tfbackend`: the help, as before
            exc.show()
            code = exc.exit_code
        except click_errors.UsageError as exc:
            typer.echo(f"error: {usage_line(exc, self._command_path(args))}", err=True)
            code = exc.exit_code
        except click_errors.ClickException as exc:
            typer.echo(f"error: {exc.format_message()}", err=True)
            code = exc.exit_code
        except Abort:  # an except clause that fails to evaluate would mask SIGTERM's SystemExit
            typer.echo("aborted", err=True)
            code = 1
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code

    def _command_path(self, args) -> str:
        """`tfbackend check`, for errors click raises without a context (a missing value)."""
        argv = list(sys.argv[1:] if args is None else args)
        sub = next((a for a in argv if not a.startswith("-")), None)
        return f"{self.name} {sub}" if sub in self.commands else str(self.name)


def usage_line(exc, fallback: str) -> str:
    """click's message, then where the options are: `no such option: --tpp (Possible options:
    --dtype, --pp, --tp); see 'tfbackend check --help'`."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    message = message[:1].lower() + message[1:]
    where = exc.ctx.command_path if exc.ctx is not None else fallback
    return f"{message}; see '{where} --help'"


app = typer.Typer(
    name="tfbackend",
    cls=OneLineErrors,
    help="Will a Hugging Face model serve correctly through vLLM's Transformers backend? "
    "`check` answers on a CPU in seconds; `run` proves it on GPUs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tfbackend {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """tfbackend: vLLM Transformers-backend compatibility checks."""


def _register() -> None:
    """Every module in tfbackend/cli/ that defines commands registers them on import."""
    import importlib
    import pkgutil

    import tfbackend.cli as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name not in ("app", "errors") and not info.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")


_register()


def main() -> None:
    app()
