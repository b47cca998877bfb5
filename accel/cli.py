"""The `accel` command line: thin argparse shims over typed library functions.

Command groups: `calibrate <method>`, `eval <what>`, `bench <what>`, `export --format F`, `demo`.
Each module listed in COMMAND_MODULES defines `register(cli: CLI)` and adds its subcommands, so
method code never imports this file's internals and library code never sees argparse objects.

Exit codes: 0 success; 2 bad input, as one line `accel: error: <Class>: <message>` (an
accel.errors.AccelError, or a ValueError/RuntimeError/OSError: library code raises those for
the user too), and argparse usage errors; 1 an unexpected exception, one line saying so (a bug:
rerun with -v for the traceback); 130 interrupted (Ctrl-C). With -v every error re-raises with
its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from typing import Any, Callable

from accel.errors import AccelError

COMMAND_MODULES = [
    "accel.eval.cli",
    "accel.calibrate.cli",
    "accel.eval.bench_ds_attention",
    "accel.eval.gqsa_cli",
    "accel.eval.bench_ds_offload",
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
        self.exporters: dict[str, tuple[Callable[..., Any], str]] = {}
        exp = self.sub.add_parser("export", help="write an artifact in another format")
        exp.add_argument("--format", required=True, dest="export_format", help="output format")
        exp.add_argument("artifact", help="artifact directory")
        exp.add_argument("--output", required=True, help="output file or directory")
        add_overwrite(exp)
        exp.add_argument("--model", default=None,
                         help="base model, for formats that need one (hf); checked against the artifact's "
                              "fingerprint. Default: the model the artifact records, if accel ships it")
        exp.set_defaults(func=self._export)

    def add(self, group: str, name: str, help: str) -> argparse.ArgumentParser:
        if group not in self.groups:
            return self.sub.add_parser(name, help=help, description=help)
        return self.groups[group].add_parser(name, help=help, description=help)

    def exporter(self, fmt: str, fn: Callable[..., Any], help: str) -> None:
        """Register `accel export --format fmt`: fn(artifact, output, model=None, overwrite=False)
        writes `output` and must call accel.artifact.check_output_path before writing anything."""
        self.exporters[fmt] = (fn, help)

    def _export(self, args) -> int:
        if args.export_format not in self.exporters:
            known = ", ".join(sorted(self.exporters)) or "none"
            raise SystemExit(f"accel export: unknown format {args.export_format!r} (known: {known})")
        out = self.exporters[args.export_format][0](args.artifact, args.output, model=args.model,
                                                    overwrite=args.overwrite)
        print(f"wrote {out or args.output}")
        return 0


def add_overwrite(p: argparse.ArgumentParser) -> None:
    """The --overwrite flag of every command that takes --output."""
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing accel output at --output (never anything accel did not write)")


def check_output(args, kind: str = "artifact") -> None:
    """Fail fast: check --output (accel.artifact.check_output_path) before a long run starts."""
    from accel.artifact import check_output_path

    check_output_path(args.output, getattr(args, "overwrite", False), kind)


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
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = "-v" in argv or "--verbose" in argv  # until parsed (for errors while building the parser)
    try:
        cli = build()
        args = cli.parser.parse_args(argv)
        verbose = args.verbose
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if verbose:
            raise
        print("accel: interrupted", file=sys.stderr)
        return 130
    except (AccelError, ValueError, RuntimeError, OSError) as e:
        # Errors meant for the user: the message names the problem; a traceback adds nothing.
        if verbose:
            raise
        print(f"accel: error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the last resort: one line instead of a traceback
        if verbose:
            raise
        print(f"accel: unexpected error (a bug in accel; rerun with -v for the traceback): "
              f"{type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    return " | ".join(line.strip() for line in str(e).splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
