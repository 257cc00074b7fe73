"""``dnsconvert run``: a whole pipeline from one TOML file."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import console, emit_json, trust_option


@click.command("run")
@click.argument("pipeline", type=click.Path(path_type=Path))
@click.option("--workdir", type=click.Path(path_type=Path), default=None, help="Override [pipeline] workdir.")
@click.option("--json", "as_json", is_flag=True, help="Print the pipeline report as JSON.")
@trust_option
def run_cmd(pipeline: Path, workdir: Path | None, as_json: bool, trust_model_code: bool) -> None:
    """Run prune -> validate -> project -> export -> bench from PIPELINE (TOML); unchanged stages are skipped."""
    from ..pipeline import run_pipeline

    report = run_pipeline(pipeline, workdir=workdir, progress=not as_json, fail_on_gate=False, trust_model_code=trust_model_code)
    report_json = report.to_json()
    if as_json:
        emit_json(report_json)
    else:
        out = console()
        for stage in report_json["stages"]:
            gates = ", ".join(f"{g['gate']} {'ok' if g['passed'] else 'FAILED'}" for g in stage["gates"])
            out.print(f"{stage['name']:<24} {stage['status']:<8} {stage['seconds']:6.1f}s  {gates}")
        out.print(f"report: {Path(report_json['workdir']) / 'report.json'}")
    if not report.passed:
        raise report.gate_error()
