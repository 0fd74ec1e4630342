"""The typer app. Each command lives in its own module and imports the heavy parts lazily."""

from __future__ import annotations

import typer

from tfbackend import __version__

app = typer.Typer(
    name="tfbackend",
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
