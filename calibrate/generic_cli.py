"""`accel calibrate <method>` for every method in the manifest that has a calibrator and no cli
module of its own: the options are the config dataclass's fields, plus the shared ones of
`accel.cli.add_calibration_args`.

Field to option: `heavy_channels: int = 4` -> `--heavy-channels N` (int, default 4); a bool
-> `--flag` / `--no-flag`; `list[str]` / `tuple[int, ...]` -> a comma list; `X | None` -> X,
default None (left out: the config's default applies). A field with no default is a required
option. `targets` / `ignore` fields are the shared `--targets` / `--ignore`. A field whose option
would clash with a shared one (`--seed`, `--model`...) is spelled `--config-<field>`. The help
of a field is its line in the config's docstring (`name: what it is`), when it has one.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import types
import typing

log = logging.getLogger(__name__)

_SCALARS = (bool, int, float, str)


def _strip_none(tp):
    """(tp without None, whether None was allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), len(args) < len(typing.get_args(tp))
    return tp, False


def _scalar(types_: tuple, what: str):
    """An argparse `type` trying each scalar type in order (int before float: "8" is a count)."""
    order = sorted(types_, key=lambda t: _SCALARS.index(t) if t in _SCALARS else len(_SCALARS))

    def parse(s: str):
        for t in order:
            if t is bool:
                if s.lower() in ("true", "false", "1", "0", "yes", "no"):
                    return s.lower() in ("true", "1", "yes")
                continue
            try:
                return t(s)
            except (TypeError, ValueError):
                pass
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
    parse.__name__ = what  # argparse names the type in its error message
    return parse


def _comma_list(item):
    def parse(s: str):
        return [item(x.strip()) for x in s.split(",") if x.strip()]
    parse.__name__ = "comma list"
    return parse


def _helps(cls) -> dict[str, str]:
    """`name: text` lines of the config's docstring (also `a / b: text` for several fields)."""
    out: dict[str, str] = {}
    for line in (cls.__doc__ or "").splitlines():
        m = re.match(r"^\s*([a-z_][\w ]*(?:/[\w ]+)*):\s+(\S.*)$", line)
        if m:
            for name in m.group(1).split("/"):
                out.setdefault(name.strip(), m.group(2).strip().replace("%", "%%"))
    return out


def field_options(cls) -> list[tuple[str, dict, str]]:
    """[(field name, add_argument kwargs, option string)] for a config dataclass's own fields
    (targets/ignore excluded: they are the shared options)."""
    hints = typing.get_type_hints(cls)
    helps = _helps(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in ("targets", "ignore"):
            continue
        tp, optional = _strip_none(hints.get(f.name, str))
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = (f.default if f.default is not dataclasses.MISSING else f.default_factory()) if has_default else None
        kw: dict = {"dest": f"cfg_{f.name}", "help": helps.get(f.name, f"config field {f.name}")}
        if tp is not bool:
            kw["metavar"] = f.name.upper()
        origin = typing.get_origin(tp)
        if tp is bool:
            kw.update(action=argparse.BooleanOptionalAction, default=default)
        elif origin in (list, tuple) or tp in (list, tuple):
            args = [a for a in typing.get_args(tp) if a is not Ellipsis]
            item = _scalar((args[0],), getattr(args[0], "__name__", "value")) if args and args[0] in _SCALARS else str
            kw.update(type=_comma_list(item), default=default, metavar="LIST")
            if default is not None:
                default = kw["default"] = list(default)
            if default:
                kw["help"] += f" (comma list; default: {','.join(map(str, default))})"
        elif origin in (typing.Union, types.UnionType):
            members = typing.get_args(tp)
            kw.update(type=_scalar(members, " or ".join(getattr(m, "__name__", str(m)) for m in members)),
                      default=default)
        elif tp in _SCALARS:
            kw.update(type=_scalar((tp,), tp.__name__), default=default)
        else:  # dict or an annotation with no command-line spelling: the config's default only
            continue
        if not has_default:
            kw["required"] = True
        elif optional and default is None:
            kw["help"] += " (default: the config's)"
        out.append((f.name, kw, "--" + f.name.replace("_", "-")))
    return out


def add_config_args(p: argparse.ArgumentParser, cls) -> list[tuple[str, str]]:
    """Add one option per field of `cls`; returns [(field, dest)] for `config_from_args`."""
    taken = set(p._option_string_actions)
    fields = []
    for name, kw, opt in field_options(cls):
        if opt in taken:
            opt = "--config-" + name.replace("_", "-")
        p.add_argument(opt, **kw)
        fields.append((name, kw["dest"]))
    return fields


def _config_from_args(args):
    kwargs = {name: getattr(args, dest) for name, dest in args.config_fields}
    names = {f.name for f in dataclasses.fields(args.config_class)}
    for shared in ("targets", "ignore"):
        if shared in names:
            kwargs[shared] = getattr(args, shared)
    return args.config_class(**kwargs)


def _cmd(args) -> int:
    import accel
    from accel.cli import calibration_spec, check_output, emit

    cfg = _config_from_args(args)  # a bad value fails here (ConfigError), before the model loads
    check_output(args)
    model, tok = accel.models.load(args.model, dtype=args.dtype)
    art = accel.calibrate(model, cfg, calibration_spec(args), args.output, tokenizer=tok,
                          checkpoint_dir=args.checkpoint_dir, overwrite=args.overwrite, progress=not args.json)
    emit({"artifact": str(art.path), "config": cfg.to_dict(), "calibration": art.calibration}, args.json,
         f"wrote {art.path} ({cfg.method})")
    return 0


def register(cli) -> None:
    from accel import methods
    from accel.cli import add_calibration_args
    from accel.configs import get_config_class
    from accel.errors import AccelError

    for name, row in methods.methods().items():
        if row.cli or row.calibrator is None:
            continue
        try:
            cls = get_config_class(name)
        except AccelError as e:
            # One broken add-on method must not take the whole command line down with it.
            log.warning("accel calibrate %s: left out: %s", name, e)
            continue
        names = {f.name for f in dataclasses.fields(cls)}
        summary = next((ln.strip() for ln in (cls.__doc__ or "").splitlines() if ln.strip()), f"calibrate {name}")
        p = cli.add("calibrate", name, summary)
        add_calibration_args(p, name, linears="targets" in names)
        p.set_defaults(func=_cmd, config_class=cls, config_fields=add_config_args(p, cls),
                       make_config=_config_from_args)
