"""`tfbackend rules` lists the rule catalog; `tfbackend explain ID` prints one rule's page."""

from __future__ import annotations

import typer

from tfbackend.cli.app import app
from tfbackend.cli.errors import EXIT_BAD_INPUT


@app.command("rules")
def list_rules() -> None:
    """List every rule: id, severity, title."""
    from tfbackend.rules.registry import load_all

    rules = load_all()
    for rule_id in sorted(rules):
        r = rules[rule_id]
        typer.echo(f"{r.id}  {r.severity.value:<7}  {r.title}")


@app.command()
def explain(rule_id: str = typer.Argument(..., help="A rule id, e.g. TFB201.")) -> None:
    """Print a rule's page: what it checks, why it matters, how to fix it, an example."""
    from tfbackend.rules.pages import page
    from tfbackend.rules.registry import load_all

    rules = load_all()
    r = rules.get(rule_id.strip().upper())
    if r is None:
        typer.echo(
            f"error: unknown rule {rule_id!r}: valid ids are {', '.join(sorted(rules))}", err=True
        )
        raise typer.Exit(EXIT_BAD_INPUT)
    typer.echo(page(r))
