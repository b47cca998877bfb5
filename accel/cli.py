"""The `accel` command line: thin argparse shims over typed library functions.

Command groups: `calibrate <method>`, `eval <what>`, `bench <what>`, `export --format F`, `demo`.
The command modules are COMMAND_MODULES below plus each method's `cli` modules in the manifest
(accel/methods.py), see `command_modules()`: each defines `register(cli: CLI)` and adds its
subcommands (`cli.add(group, name)`, top-level ones with `cli.command(name)`, exporters with
`cli.exporter(fmt)`), so method code never imports this file's internals and
library code never sees argparse objects. Every `calibrate` subcommand takes the shared options
of `add_calibration_args` (one spelling each; old spellings still work with a note on stderr).

Exit codes: 0 success; 2 bad input, as one line `accel: error: <Class>: <message>` (an
accel.errors.AccelError, or a ValueError/OSError: bad values and unreadable paths), and argparse
usage errors; 1 an unexpected exception (any other, a plain RuntimeError from torch included), one
line saying so (a bug: rerun with -v for the traceback); 130 interrupted (Ctrl-C). With -v every error re-raises with
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

# Commands that belong to no one method. Each method's command modules are in its manifest row
# (accel/methods.py, `cli`: calibrate/<method>_cli.py for `calibrate <method>` and its exporters,
# eval/<method>_cli.py for its `eval` and `bench` commands); generic_cli gives every method
# without one a `calibrate <method>` built from its config's fields.
COMMAND_MODULES = [
    "accel.eval.cli",                # eval ppl, demo
    "accel.calibrate.generic_cli",   # calibrate <method> of the methods with no cli module
    "accel.calibrate.recipe_cli",    # calibrate recipe RECIPE.yaml: several methods in one artifact
]


def command_modules() -> list[str]:
    """COMMAND_MODULES, then every method's cli modules in manifest order: the one command registry."""
    from accel import methods

    return COMMAND_MODULES + [m for r in methods.methods().values() for m in r.cli]


DTYPES = ("float32", "bfloat16", "float16")
GROUPS = {"calibrate": ("METHOD", "compute an artifact for a method (see `accel calibrate --help`)"),
          "eval": ("WHAT", "perplexity, sweeps and retrieval evaluations"),
          "bench": ("WHAT", "speed and memory benchmarks (ratios measured in one run)")}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (None and off flags say nothing); descriptions
    and epilogs keep their line breaks (the export format list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        d = action.default
        if ("%(default)" in help_ or "default" in help_.lower() or action.required or not action.option_strings
                or d is None or d is False or d is argparse.SUPPRESS):
            return help_
        return f"{help_} (default: %(default)s)" if help_ else "(default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with accel's help formatter on every (sub)parser, and a help line for every option
    (argparse prints nothing, not even the default, for an option without help)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if action.help is None and action.option_strings:
            action.help = HelpFormatter._get_help_string(None, action) or None  # type: ignore[arg-type]
        return action


class CLI:
    def __init__(self) -> None:
        self.parser = Parser(prog="accel", description="Post-training sparsity and quantization for "
                                                       "HuggingFace transformers.")
        self.parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        self.sub = self.parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
        self.groups: dict[str, argparse._SubParsersAction] = {}
        for name, (metavar, help_) in GROUPS.items():
            p = self.sub.add_parser(name, help=help_, description=help_)
            self.groups[name] = p.add_subparsers(dest=f"{name}_command", required=True, metavar=metavar)
        self.exporters: dict[str, tuple[Callable[..., Any], str]] = {}
        self._export_parser = exp = self.sub.add_parser("export", help="write an artifact in another format",
                                                        description="write an artifact in another format")
        exp.add_argument("--format", required=True, dest="export_format", metavar="FORMAT",
                         help="output format (listed below)")
        exp.add_argument("artifact", help="artifact directory")
        exp.add_argument("--output", required=True, metavar="PATH", help="output file or directory")
        add_overwrite(exp)
        exp.add_argument("--model", default=None,
                         help="base model, for formats that need one (hf); checked against the artifact's "
                              "fingerprint. Default: the model the artifact records, if accel ships it")
        exp.set_defaults(func=self._export)

    def add(self, group: str, name: str, help: str) -> argparse.ArgumentParser:
        """`accel <group> <name>`; group is one of GROUPS."""
        if group not in self.groups:
            raise ValueError(f"unknown command group {group!r} for {name!r} (groups: {', '.join(self.groups)}; "
                             f"a top-level command uses cli.command)")
        return self.groups[group].add_parser(name, help=help, description=help)

    def command(self, name: str, help: str) -> argparse.ArgumentParser:
        """A top-level command, `accel <name>` (like `demo`)."""
        return self.sub.add_parser(name, help=help, description=help)

    def exporter(self, fmt: str, fn: Callable[..., Any], help: str) -> None:
        """Register `accel export --format fmt`: fn(artifact, output, model=None, overwrite=False)
        writes `output` and must call accel.artifact.check_output_path before writing anything."""
        self.exporters[fmt] = (fn, help)

    def finish(self) -> None:
        """After every module registered: `accel export --help` lists the formats."""
        width = max((len(f) for f in self.exporters), default=0)
        self._export_parser.epilog = "formats:\n" + "\n".join(
            f"  {fmt.ljust(width)}  {help_}" for fmt, (_, help_) in sorted(self.exporters.items()))

    def _export(self, args) -> int:
        if args.export_format not in self.exporters:
            known = ", ".join(sorted(self.exporters)) or "none"
            from accel.configs import ConfigError

            raise ConfigError(f"accel export: unknown format {args.export_format!r} (known: {known})")
        out = self.exporters[args.export_format][0](args.artifact, args.output, model=args.model,
                                                    overwrite=args.overwrite)
        print(f"wrote {out or args.output}")
        return 0


class DeprecatedAlias(argparse.Action):
    """An old spelling of an option: stores into the same dest and says the new spelling on stderr.
    Hidden from help (the new option's help names it)."""

    def __init__(self, option_strings, dest, canonical: str, **kwargs) -> None:
        kwargs.update(default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)
        self.canonical = canonical

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"accel: note: {option_string} is deprecated; use {self.canonical}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_option(p: argparse.ArgumentParser, name: str, *old: str, help: str = "", **kwargs) -> None:
    """`name`, plus deprecated spellings `old` that keep working (with a note on stderr)."""
    if old:
        help = f"{help} (old spelling{'s' * (len(old) > 1)} {', '.join(old)} still work{'s' * (len(old) == 1)})"
    action = p.add_argument(name, help=help.strip(), **kwargs)
    if old:
        p.add_argument(*old, dest=action.dest, action=DeprecatedAlias, canonical=name, type=kwargs.get("type"))


def name_list(s: str) -> list[str]:
    """`--targets`/`--ignore`: a comma list of module names, class names or `re:` regexes (the
    matching of accel.patches.targets). A comma inside (), [] or {} is part of a regex."""
    items, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth <= 0:
            items.append(cur.strip())
            cur = ""
        else:
            cur += ch
    items.append(cur.strip())
    items = [i for i in items if i]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma list of names or re:regexes, got {s!r}")
    return items


def add_sweep_calibration_args(p: argparse.ArgumentParser, n_samples: int, seq_len: int | None = None,
                               old_samples: tuple[str, ...] = ("--n-samples",)) -> None:
    """The calibration options of an `accel eval <method>-sweep` (or another eval command that
    calibrates): the same spellings as `accel calibrate`, `--num-calibration-samples` and
    `--max-seq-length` (calibration window; the eval window stays `--seq-len`). Each sweep keeps its
    own measured defaults; old spellings still work with a note. seq_len None: the command uses its
    eval window for calibration too and takes no --max-seq-length."""
    add_option(p, "--num-calibration-samples", *old_samples, type=int, default=n_samples, metavar="N",
               help="calibration windows")
    if seq_len is not None:
        add_option(p, "--max-seq-length", "--calib-seq-len", type=int, default=seq_len, metavar="TOKENS",
                   help="tokens per calibration window")


def add_overwrite(p: argparse.ArgumentParser) -> None:
    """The --overwrite flag of every command that takes --output."""
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing accel output at --output (never anything accel did not write)")


def add_calibration_args(p: argparse.ArgumentParser, method: str | None, *, linears: bool = True,
                         checkpoints: bool = True) -> None:
    """The options every `accel calibrate <method>` shares, one spelling each (llm-compressor's
    where it has one). Defaults: the library's (`accel.calibrate.registry.default_spec(method)`:
    accel.data.CalibrationSpec and the method's measured departures), so the CLI cannot drift.
    linears: the method replaces linears, so it takes --targets/--ignore (into its config's
    `targets`/`ignore`). checkpoints: the method checkpoints per layer (--checkpoint-dir).
    method None (`calibrate recipe`): the data options default to None, each stage's method default."""
    from accel.calibrate.registry import default_spec

    spec = default_spec(method)
    each = ""
    if method is None:
        each = " (default: each stage's own, else its method's default)"
        spec = argparse.Namespace(source=None, n_samples=None, seq_len=None, seed=None)
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (embedded), a hub name or a local dir")
    p.add_argument("--output", required=True, metavar="DIR", help="artifact directory to write")
    add_overwrite(p)
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype the model is loaded in")
    p.add_argument("--source", default=spec.source, help="calibration text: wiki (offline) or "
                                                         "wikitext2/c4/pileval (online)" + each)
    add_option(p, "--num-calibration-samples", "--n-samples", "--samples", type=int, default=spec.n_samples,
               metavar="N", help="calibration windows" + each)
    add_option(p, "--max-seq-length", "--seq-len", type=int, default=spec.seq_len, metavar="TOKENS",
               help="tokens per calibration window" + each)
    p.add_argument("--seed", type=int, default=spec.seed, help="seed of the calibration sample draw" + each)
    if linears:
        p.add_argument("--targets", type=name_list, default=None, metavar="LIST",
                       help="linears to change: comma list of module names, class names or re:regexes "
                            "(default: every linear in the decoder layers)")
        p.add_argument("--ignore", type=name_list, default=[], metavar="LIST",
                       help="linears to leave dense: comma list of module names, class names or re:regexes")
    if checkpoints:
        p.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                       help="per-layer checkpoints; rerun the same command to resume (default OUTPUT.partial, "
                            "removed after success)")
    p.add_argument("--json", action="store_true", help="last stdout line is one JSON object")


def calibration_spec(args):
    """The accel.data.CalibrationSpec of a calibrate command's arguments."""
    from accel.data import CalibrationSpec

    return CalibrationSpec(source=args.source, n_samples=args.num_calibration_samples,
                           seq_len=args.max_seq_length, seed=args.seed)


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


PLUGINS_ENV = "ACCEL_PLUGINS"


def import_plugins() -> list[str]:
    """Import the packages named in $ACCEL_PLUGINS (a comma list), so that the methods they add
    to the manifest (accel.methods.add_method on import) have their commands. Returns the names."""
    from accel.methods import MethodError

    names = [n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise MethodError(f"{PLUGINS_ENV}: cannot import {name!r}: {e}") from e
    return names


def build() -> CLI:
    import_plugins()
    cli = CLI()
    for mod in command_modules():
        importlib.import_module(mod).register(cli)
    cli.finish()
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
    except (AccelError, ValueError, OSError) as e:
        # Errors meant for the user (accel's own, bad values, unreadable paths): the message names
        # the problem; a traceback adds nothing. A plain RuntimeError (a torch shape error, out of
        # memory) is not bad input: it falls through to the unexpected-error branch below.
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
