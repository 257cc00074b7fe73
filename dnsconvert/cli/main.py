"""The command group and the one error boundary that maps exceptions to exit codes.

Exit codes: 0 all good, 1 a rule or gate failed, 2 unusable input (user error, one line
on stderr; ``--debug`` adds the traceback), 3 a bug (traceback kept), 130 interrupted.
Sub-command modules import torch and the library inside their functions, so that
``dnsconvert --help`` stays fast.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

import click

from ..errors import DnsconvertError, GateFailed, UserError
from ..limits import help_text

# name -> "module:attribute"; loaded on first use (click's LazyGroup recipe).
COMMANDS = {
    "validate": "dnsconvert.cli.validate:validate_cmd",
    "inspect": "dnsconvert.cli.validate:inspect_cmd",
    "project": "dnsconvert.cli.project:project_cmd",
    "prune": "dnsconvert.cli.prune:prune_cmd",
    "export": "dnsconvert.cli.export:export_cmd",
    "densify": "dnsconvert.cli.export:densify_cmd",
    "targets": "dnsconvert.cli.targets:targets_cmd",
    "bench": "dnsconvert.cli.bench:bench_cmd",
    "run": "dnsconvert.cli.run:run_cmd",
}


def _one_line(exc: BaseException) -> str:
    """The contract is one stderr line: a message quoting a multi-line library error is joined."""
    return " / ".join(line.strip() for line in str(exc).splitlines() if line.strip())


class DnsconvertGroup(click.Group):
    """A group that loads sub-commands lazily and is the single error boundary."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, _, attr = target.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("dnsconvert"):
                return None  # the command's module is not part of this build
            raise

    def invoke(self, ctx: click.Context):  # noqa: D401 - click API
        debug = bool(ctx.params.get("debug")) or os.environ.get("DNSCONVERT_DEBUG") == "1"
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("dnsconvert: interrupted", err=True)
            ctx.exit(130)
        except UserError as exc:
            if debug:
                traceback.print_exc()
            click.echo(f"dnsconvert: error: {_one_line(exc)}", err=True)
            ctx.exit(exc.exit_code)
        except GateFailed as exc:
            click.echo(f"dnsconvert: gate failed: {_one_line(exc)}", err=True)
            ctx.exit(exc.exit_code)
        except DnsconvertError as exc:
            traceback.print_exc()
            click.echo(f"dnsconvert: internal error (a bug): {exc}", err=True)
            ctx.exit(3)
        except Exception:  # a bug: keep its traceback
            traceback.print_exc()
            click.echo("dnsconvert: internal error (a bug); please report it with the traceback above", err=True)
            ctx.exit(3)


@click.group(cls=DnsconvertGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=help_text())
@click.option("--debug", is_flag=True, help="Show tracebacks for user errors too.")
@click.version_option(package_name="dnsconvert")
def cli(debug: bool) -> None:
    """dnsconvert: from sparse training (Dynamic Network Surgery) to a measured sparse runtime.

    \b
    Stages:  prune -> validate -> project -> export -> bench   (or all at once: run)
    Exit codes: 0 ok, 1 a rule/gate failed, 2 bad input, 3 internal error.
    """


def main() -> None:
    cli(prog_name="dnsconvert")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
