"""``dnsconvert targets``: every registered target, whether it is usable here, and why not."""

from __future__ import annotations

import click

from ._common import console, emit_json


@click.command("targets")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def targets_cmd(as_json: bool) -> None:
    """List targets (runtimes) from the dnsconvert.targets entry points."""
    from ..targets import list_targets

    rows = []
    for entry in list_targets():
        if entry.target is None:
            rows.append({"name": entry.name, "available": False, "reason": f"plugin failed to load: {entry.error}", "origin": entry.origin, "description": "", "exploits_sparsity": "", "options": {}})
            continue
        status = entry.target.availability()
        rows.append(
            {
                "name": entry.name,
                "available": status.available,
                "reason": status.reason,
                "origin": entry.origin,
                "description": entry.target.description,
                "exploits_sparsity": entry.target.exploits_sparsity,
                "options": dict(entry.target.option_help),
            }
        )
    if as_json:
        emit_json(rows)
        return
    from rich.table import Table

    table = Table(title="dnsconvert targets", title_justify="left")
    for column in ("target", "available", "reason / description", "speeds up sparse?"):
        table.add_column(column)
    for row in rows:
        text = row["reason"] if not row["available"] else f"{row['description']} ({row['reason']})" if row["reason"] else row["description"]
        table.add_row(row["name"], "yes" if row["available"] else "[red]no[/red]", text, row["exploits_sparsity"])
    console().print(table)
