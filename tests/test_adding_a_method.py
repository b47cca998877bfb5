"""A new method through the five places of docs/adding_a_method.md, and nothing else.

The toy is tests/toy_keep_last, a "keep the last N tokens" KV press: (1) config.py, (2) kernel/,
(3) runtime.py, (4) calibrate.py, (5) the manifest row in its __init__.py. Here it calibrates
(Python and the generic CLI), round-trips its artifact, patches, changes the logits only when the
context is longer than n, shows in accel.report, stacks by its claims and unpatches exactly.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import accel
from accel.calibrate import registry as cal_registry
from accel.configs import ConfigError
from accel.configs import base as cfg_base
from accel.patches import compat, core
from kernel_tolerances import ratio_bound, rel_err

ROOT = Path(__file__).resolve().parents[1]
TOY = Path(__file__).resolve().parent / "toy_keep_last"
PKG = "toy_keep_last"
NAME = "keep-last"


def _forget_toy() -> None:
    """Remove every trace of the toy: its row, its registrations, its modules."""
    accel.methods._METHODS.pop(NAME, None)
    cfg_base._REGISTRY.pop(NAME, None)
    core._APPLIERS.pop(NAME, None)
    core._CLAIMS.pop(NAME, None)
    cal_registry._REGISTRY.pop(NAME, None)
    for m in [m for m in sys.modules if m == PKG or m.startswith(PKG + ".")]:
        del sys.modules[m]


@pytest.fixture
def toy():
    """The toy package freshly imported (its manifest row added), removed again afterwards so
    that the other tests see the built-in methods only."""
    _forget_toy()
    import toy_keep_last  # noqa: F401  (adds the manifest row)

    try:
        yield sys.modules[PKG]
    finally:
        _forget_toy()


def _config(**kw):
    return accel.configs.get_config_class(NAME)(**kw)


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def _ids(T, seed=42):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 512, (1, T), generator=g)


# --------------------------------------------------------------------------------------------
# Exactly five places
# --------------------------------------------------------------------------------------------
def test_the_toy_is_five_places_and_accel_does_not_name_it():
    files = sorted(p.relative_to(TOY).as_posix() for p in TOY.rglob("*.py"))
    assert files == ["__init__.py", "calibrate.py", "config.py", "kernel/__init__.py", "kernel/cpu.py",
                     "kernel/reference.py", "runtime.py"]
    # The manifest row is the only line of __init__.py that runs code besides the import.
    init = (TOY / "__init__.py").read_text()
    assert init.count("add_method(") == 1
    # accel itself was not edited for it: no file of the package names the toy.
    for d in ("accel", "patches", "calibrate", "eval"):
        for p in (ROOT / d).rglob("*.py"):
            assert PKG not in p.read_text(), p


def test_the_manifest_row_is_the_only_registration_and_the_rest_loads_from_it(toy):
    # Importing the package added the row and nothing else: no config, applier or calibrator yet.
    assert accel.methods.row(NAME).config == f"{PKG}.config"
    assert NAME not in cfg_base._REGISTRY and NAME not in core._APPLIERS and NAME not in cal_registry._REGISTRY
    assert not [m for m in sys.modules if m.startswith(PKG + ".")]
    # Each registry imports its module from the row on first use.
    assert accel.configs.get_config_class(NAME).__module__ == f"{PKG}.config"
    assert cal_registry.get_calibrator(NAME).fn.__module__ == f"{PKG}.calibrate"
    assert core.get_applier(NAME).__module__ == f"{PKG}.runtime"
    assert NAME in accel.configs.registered_methods()


# --------------------------------------------------------------------------------------------
# (1) the config
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,msg", [({"n": 0}, "keep-last: n must be >= 1"), ({"n": 4, "sink": 4}, "sink must be"),
                                    ({"sink": -1}, "sink must be"), ({"n": "8"}, "n must be an int")])
def test_config_refuses_bad_values(toy, kw, msg):
    with pytest.raises(ConfigError, match=msg):
        _config(**kw)


# --------------------------------------------------------------------------------------------
# (2) the kernel folder: the fast path against the reference, with an absolute floor
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,n,sink", [(63, 16, 4), (1000, 128, 4)])
@pytest.mark.parametrize("Tq", ["all", 1], ids=["prefill", "decode"])
def test_kernel_cpu_path_matches_the_reference(toy, T, n, sink, Tq):
    from toy_keep_last.kernel import keep_last_attention

    g = torch.Generator().manual_seed(42)
    rows = T if Tq == "all" else 1
    q = torch.randn(2, 4, rows, 16, generator=g)
    k, v = torch.randn(2, 2, T, 16, generator=g), torch.randn(2, 2, T, 16, generator=g)
    scale = 16 ** -0.5
    ref64 = keep_last_attention(q.double(), k.double(), v.double(), n, sink, scale, path="reference")
    ref32 = keep_last_attention(q, k, v, n, sink, scale, path="reference")
    cpu = keep_last_attention(q, k, v, n, sink, scale, path="cpu")
    bound = ratio_bound(rel_err(ref32, ref64), torch.float32, n)
    assert rel_err(cpu, ref64) <= bound, (rel_err(cpu, ref64), bound)
    # The window matters at these shapes: full causal attention is far off.
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=Tq == "all", scale=scale,
                                                             enable_gqa=True)
    assert rel_err(dense, ref64) > 1e-2


def test_kernel_is_dense_when_the_context_fits_and_refuses_bad_shapes(toy):
    from toy_keep_last.kernel import keep_last_attention

    g = torch.Generator().manual_seed(42)
    q, k, v = (torch.randn(1, 4, 63, 16, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert rel_err(keep_last_attention(q, k, v, 63, 4), dense) <= ratio_bound(0.0, torch.float32, 63)
    with pytest.raises(ValueError, match="does not fit q"):
        keep_last_attention(q, k[..., :8], v[..., :8], 8, 0)
    with pytest.raises(ValueError, match="sink < n"):
        keep_last_attention(q, k, v, 8, 8)


# --------------------------------------------------------------------------------------------
# (3)-(5) end to end: calibrate, artifact, patch, report, stacking, unpatch
# --------------------------------------------------------------------------------------------
def test_calibrate_patch_report_unpatch(toy, tmp_path):
    model = accel.models.tiny("llama")
    long_ids, short_ids = _ids(24), _ids(8)
    dense_long, dense_short = _logits(model, long_ids), _logits(model, short_ids)

    cfg = _config(n=8, sink=2)
    art = accel.calibrate(model, cfg, output=tmp_path / "art", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no checkpoint directory left
    loaded = accel.Artifact.load(tmp_path / "art")
    assert loaded.configs == [cfg] and type(loaded.configs[0]).__name__ == "KeepLastConfig"
    assert loaded.tensors_for(NAME)["dims"].tolist() == [4, 2, 16] == art.tensors_for(NAME)["dims"].tolist()

    accel.patch(model, tmp_path / "art")
    rows = accel.report(model).rows
    assert [(r["module"], r["method"], r["kind"], r["kernel"]) for r in rows] == [
        (f"model.layers.{i}.self_attn", NAME, "attention", "keep-last-cpu") for i in range(4)]
    assert "n=8 sink=2" in str(accel.report(model))
    # Context <= n: dense, bit for bit; longer: the press changes the logits.
    assert torch.equal(_logits(model, short_ids), dense_short)
    pressed = _logits(model, long_ids)
    assert (pressed - dense_long).abs().max() > 1e-3
    # The first n positions see at most n tokens: unchanged there.
    assert torch.equal(pressed[:, :8], dense_long[:, :8])
    # With and without a cache, and one decode step after a prefill, the press is the same math.
    assert torch.allclose(_logits(model, long_ids, use_cache=False), pressed, atol=1e-5)
    with torch.no_grad():
        pre = model(long_ids[:, :-1], use_cache=True)
        step = model(long_ids[:, -1:], **compat.cache_kwargs(compat.output_cache(pre))).logits
    assert torch.allclose(step[:, -1], pressed[:, -1], atol=1e-5)

    # Stacking by its claims alone: a second attention method is refused, a weight method stacks.
    with pytest.raises(accel.PatchConflictError, match="identity .* on keep-last"):
        accel.patch(model, accel.IdentityConfig(linears=False))
    accel.patch(model, accel.IdentityConfig(attention=False))
    assert torch.equal(_logits(model, long_ids), pressed)

    accel.unpatch(model)
    assert not accel.is_patched(model)
    assert torch.equal(_logits(model, long_ids), dense_long)


def test_generation_is_dense_while_the_context_fits(toy):
    model = accel.models.tiny("llama")
    ids = _ids(5)
    gen = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        dense = model.generate(ids, **gen)
        with accel.patched(model, _config(n=8)):
            same = model.generate(ids, **gen)
        with accel.patched(model, _config(n=2, sink=1)):
            other = model.generate(ids, **gen)
    assert torch.equal(same.sequences, dense.sequences)
    assert all(torch.equal(a, b) for a, b in zip(same.scores, dense.scores))
    assert not torch.equal(other.scores[0], dense.scores[0])


def test_an_artifact_for_another_model_is_refused_and_the_model_is_unchanged(toy, tmp_path):
    art = accel.calibrate(accel.models.tiny("llama"), _config(n=8), progress=False)
    art.tensors[f"{NAME}/dims"] = torch.tensor([4, 2, 32])
    model = accel.models.tiny("llama")
    before = _logits(model, _ids(24))
    with pytest.raises(accel.ArtifactError, match=r"keep-last: the artifact's dims \[4, 2, 32\]"):
        accel.patch(model, art)
    assert not accel.is_patched(model) and torch.equal(_logits(model, _ids(24)), before)


# --------------------------------------------------------------------------------------------
# The generic CLI: `accel calibrate keep-last` from the config's fields
# --------------------------------------------------------------------------------------------
def test_generic_cli_calibrates_the_toy(toy, tmp_path, capsys, monkeypatch):
    from accel.cli import main

    loads = []

    def load(name, dtype="float32", **kw):
        loads.append((name, dtype))
        return accel.models.tiny("llama"), None  # keep-last needs no data, so no tokenizer
    monkeypatch.setattr(accel.models, "load", load)

    with pytest.raises(SystemExit):
        main(["calibrate", "keep-last", "--help"])
    help_ = capsys.readouterr().out
    assert "Keep the last N tokens" in help_
    assert "--n N" in help_ and "(default: 64)" in help_ and "--sink SINK" in help_
    assert "--num-calibration-samples" in help_ and "--targets" not in help_  # no linears in its config

    out = tmp_path / "art"
    rc = main(["calibrate", "keep-last", "--n", "8", "--sink", "2", "--model", "tiny-llama", "--output", str(out),
               "--json"])
    res = capsys.readouterr()
    assert rc == 0, res.err
    assert json.loads(res.out.strip().splitlines()[-1])["artifact"] == str(out)
    assert loads == [("tiny-llama", "float32")]
    assert accel.Artifact.load(out).configs == [_config(n=8, sink=2)]

    rc = main(["calibrate", "keep-last", "--n", "0", "--output", str(tmp_path / "bad")])
    assert rc == 2 and "ConfigError: keep-last: n must be >= 1" in capsys.readouterr().err
    assert len(loads) == 1 and not (tmp_path / "bad").exists()  # refused before the model loads


def test_generic_cli_options_follow_the_field_types(capsys):
    """Each kind of field gets its spelling: bool flags, comma lists, optional and union numbers,
    required fields, and a field that would clash with a shared option."""
    from accel.calibrate.generic_cli import add_config_args
    from accel.cli import Parser, add_calibration_args
    from accel.configs import MethodConfig

    @dataclass
    class Rich(MethodConfig):
        """Rich.

        layers: which layers, a comma list
        """
        method: ClassVar[str] = "rich"
        ratio: float
        quantize: bool = True
        layers: list[int] = field(default_factory=lambda: [1, 2])
        budget: float | int = 0.5
        limit: int | None = None
        seed: int = 3
        table: dict = field(default_factory=dict)

    p = Parser(prog="x")
    add_calibration_args(p, "rich", linears=False)
    fields = dict(add_config_args(p, Rich))
    assert "table" not in fields  # no command-line spelling: the config's default applies
    base = ["--output", "o"]

    def cfg(*argv):
        a = p.parse_args(base + list(argv))
        return Rich(**{name: getattr(a, dest) for name, dest in fields.items()})
    assert cfg("--ratio", "0.1") == Rich(ratio=0.1)
    assert cfg("--ratio", "1", "--no-quantize", "--layers", "3,5", "--budget", "8", "--limit", "4",
               "--config-seed", "9") == Rich(ratio=1.0, quantize=False, layers=[3, 5], budget=8, limit=4, seed=9)
    assert isinstance(cfg("--ratio", "1", "--budget", "8").budget, int)  # a count, not 8.0
    assert p.parse_args(base + ["--ratio", "1", "--seed", "5"]).seed == 5  # the shared option keeps its name
    with pytest.raises(SystemExit):
        p.parse_args(base)  # --ratio has no default: required
    assert "the following arguments are required: --ratio" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        p.parse_args(base + ["--ratio", "1", "--layers", "3,x"])
    assert "--layers" in capsys.readouterr().err
    assert "which layers, a comma list (comma list; default: 1,2)" in " ".join(p.format_help().split())


def test_accel_plugins_adds_an_add_on_method_to_the_command_line(toy, monkeypatch, capsys):
    from accel.cli import main

    _forget_toy()  # not imported: the command line imports it from ACCEL_PLUGINS
    with pytest.raises(SystemExit):
        main(["calibrate", "keep-last", "--help"])
    assert "invalid choice: 'keep-last'" in capsys.readouterr().err
    monkeypatch.setenv("ACCEL_PLUGINS", f" {PKG} ,")
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "keep-last", "--help"])
    assert e.value.code == 0 and "--sink SINK" in capsys.readouterr().out
    monkeypatch.setenv("ACCEL_PLUGINS", "no_such_accel_plugin")
    assert main(["calibrate", "--help"]) == 2
    assert "MethodError: ACCEL_PLUGINS: cannot import 'no_such_accel_plugin'" in capsys.readouterr().err


@pytest.fixture
def scratch_rows():
    """Rows added by a test are removed after it."""
    before = dict(accel.methods._METHODS)
    yield
    accel.methods._METHODS.clear()
    accel.methods._METHODS.update(before)


@pytest.mark.parametrize("kw,msg", [
    (dict(name="Keep_Last", config="m.c", runtime="m.r"), "lower-case words joined by '-'"),
    (dict(name="x-y", config="not a module", runtime="m.r"), "config must be a dotted module name"),
    (dict(name="x-y", config="m.c", runtime=None), "runtime must be a dotted module name"),
    (dict(name="x-y", config="m.c", runtime="m.r", cli=["m.cli", "bad/cli"]), "cli must be a dotted"),
    (dict(name="x-y", config="m.c", runtime="m.r", calibration={"samples": 3}), r"unknown key\(s\) \['samples'\]"),
    (dict(name="prune", config="m.c", runtime="m.r"), "'prune' is already in the manifest"),
])
def test_add_method_refuses_a_bad_row(scratch_rows, kw, msg):
    name = kw.pop("name")
    with pytest.raises(accel.methods.MethodError, match=msg):
        accel.methods.add_method(name, **kw)
    assert accel.methods.row(name) in (None, accel.methods.BUILTIN_METHODS.get(name))


def test_a_row_whose_modules_do_not_register_is_a_clear_error(scratch_rows, tmp_path):
    from accel.calibrate.registry import get_calibrator

    # `json` imports fine but registers nothing; the calibrator module does not exist.
    accel.methods.add_method("hollow", config="json", runtime="json", calibrator="no_such_module_for_accel")
    assert accel.methods.add_method("hollow", config="json", runtime="json",
                                    calibrator="no_such_module_for_accel").config == "json"  # same row: no-op
    with pytest.raises(ConfigError, match="'hollow': its config module 'json' was imported but registered no config"):
        accel.configs.get_config_class("hollow")
    with pytest.raises(accel.ArtifactError, match="'hollow': its runtime module 'json' .* registered no applier"):
        core.get_applier("hollow")
    with pytest.raises(accel.methods.MethodError, match="cannot import its calibrator module 'no_such_module_for_"):
        get_calibrator("hollow")
    # An artifact naming it: refused at load, naming the file.
    art = accel.Artifact.for_model(accel.models.tiny("llama"), accel.IdentityConfig())
    art.save(tmp_path / "a")
    doc = json.loads((tmp_path / "a" / "accel_config.json").read_text())
    doc["methods"][0]["method"] = "hollow"
    (tmp_path / "a" / "accel_config.json").write_text(json.dumps(doc))
    with pytest.raises(accel.ArtifactError, match=r"accel_config.json: methods\[0\]: .*'hollow'"):
        accel.Artifact.load(tmp_path / "a")


def test_import_accel_imports_no_method_module():
    """The registries load method modules from the manifest on first use, not on `import accel`."""
    import subprocess

    code = ("import sys, accel, accel.methods as M; "
            "mods = {m for r in M.BUILTIN_METHODS.values() for m in (r.config, r.runtime, r.calibrator, *r.cli)}; "
            "loaded = sorted(mods & set(sys.modules)); assert not loaded, loaded; "
            "accel.configs.get_config_class('gqsa'); assert 'accel.configs.gqsa' in sys.modules; "
            "assert 'accel.patches.gqsa' not in sys.modules and 'accel.calibrate.gqsa' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
