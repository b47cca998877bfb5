"""The `accel` command line: thin argparse shims over typed library functions.

Command groups: `calibrate <method>`, `eval <what>`, `bench <what>`, `export --format F`, `demo`.
Each module listed in COMMAND_MODULES defines `register(cli: CLI)` and adds its subcommands, so
method code never imports this file's internals and library code never sees argparse objects.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from typing import Any, Callable

COMMAND_MODULES = [
    "accel.eval.cli",
    "accel.calibrate.cli",
    "accel.eval.bench_ds_attention",
    "accel.eval.gqsa_cli",
]


class CLI:
    def __init__(self) -> None:
        self.parser = argparse.ArgumentParser(prog="accel", description="Post-training sparsity and "
                                              "quantization for HuggingFace transformers.")
        self.parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        self.sub = self.parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
        self.groups: dict[str, argparse._SubParsersAction] = {}
        helps = {"calibrate": "compute an artifact for a method (see `accel calibrate --help`)",
                 "eval": "perplexity, sweeps and retrieval evaluations",
                 "bench": "speed and memory benchmarks (ratios measured in one run)"}
        for name, help_ in helps.items():
            p = self.sub.add_parser(name, help=help_, description=help_)
            self.groups[name] = p.add_subparsers(dest=f"{name}_command", required=True, metavar="METHOD"
                                                 if name == "calibrate" else "WHAT")
        self.exporters: dict[str, tuple[Callable[[str, str], Any], str]] = {}
        exp = self.sub.add_parser("export", help="write an artifact in another format")
        exp.add_argument("--format", required=True, dest="export_format", help="output format")
        exp.add_argument("artifact", help="artifact directory")
        exp.add_argument("--output", required=True, help="output file or directory")
        exp.set_defaults(func=self._export)

    def add(self, group: str, name: str, help: str) -> argparse.ArgumentParser:
        if group not in self.groups:
            return self.sub.add_parser(name, help=help, description=help)
        return self.groups[group].add_parser(name, help=help, description=help)

    def exporter(self, fmt: str, fn: Callable[[str, str], Any], help: str) -> None:
        self.exporters[fmt] = (fn, help)

    def _export(self, args) -> int:
        if args.export_format not in self.exporters:
            known = ", ".join(sorted(self.exporters)) or "none"
            raise SystemExit(f"accel export: unknown format {args.export_format!r} (known: {known})")
        out = self.exporters[args.export_format][0](args.artifact, args.output)
        print(f"wrote {out or args.output}")
        return 0


def emit(result: dict, as_json: bool, text: str | None = None) -> None:
    """Print a human summary, and with --json make the last stdout line one JSON object."""
    if text:
        print(text)
    if as_json:
        print(json.dumps(result, default=float))


def build() -> CLI:
    cli = CLI()
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).register(cli)
    return cli


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli = build()
    args = cli.parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except (ValueError, RuntimeError, OSError) as e:
        # Library errors carry a message meant for the user; a traceback adds nothing with -v off.
        if args.verbose:
            raise
        print(f"accel: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
