"""`accel calibrate <method>`: each method's module registers its own subcommand here."""
from __future__ import annotations

# Each method issue adds its CLI module to this list; each module defines `register(cli)`.
METHOD_CLI_MODULES: list[str] = [
    "accel.calibrate.ds_cli",
    "accel.eval.ds_cli",
    "accel.calibrate.prune_cli",
    "accel.calibrate.rsparse_cli",
]


def register(cli) -> None:
    import importlib

    for mod in METHOD_CLI_MODULES:
        importlib.import_module(mod).register(cli)
METHOD_CLI_MODULES.append("accel.calibrate.gqsa_cli")
