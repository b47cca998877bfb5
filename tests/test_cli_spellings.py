"""One spelling per shared calibrate option, old spellings with a note, defaults in --help, one
command registry, and `accel.report` totals (fast: parsing, help text and tiny models only)."""
import re

import pytest

import accel
from accel.cli import build, main

CALIBRATE = ["double-sparsity", "wanda", "magnitude", "dsnot", "rsparse", "gqsa"]
LINEARS = ["wanda", "magnitude", "dsnot", "rsparse", "gqsa"]  # methods that replace linears
# Double Sparsity's calibration is one plain forward with nothing per layer to resume, so it
# takes neither --checkpoint-dir nor --targets/--ignore (it changes attention, not linears).
CHECKPOINTS = LINEARS
TARGETS = "q_proj,re:mlp\\.(up|down)_proj,re:layers\\.[0-9]{1,2}\\.self_attn\\.o_proj"
IGNORE = "re:layers\\.0\\.,k_proj"


def _parse(argv):
    return build().parser.parse_args(argv)


def _sub(argv):
    """The subparser of `accel <argv...>`."""
    p = build().parser
    for word in argv:
        p = next(a for a in p._actions if a.dest in ("command", f"{argv[0]}_command")).choices[word]
    return p


@pytest.mark.parametrize("cmd", CALIBRATE)
def test_every_calibrate_command_accepts_the_canonical_options(cmd, tmp_path, capsys):
    argv = ["calibrate", cmd, "--model", "tiny-llama", "--output", str(tmp_path / "a"), "--overwrite",
            "--num-calibration-samples", "3", "--max-seq-length", "48", "--seed", "7", "--dtype", "bfloat16",
            "--source", "wiki", "--json"]
    if cmd in CHECKPOINTS:
        argv += ["--checkpoint-dir", str(tmp_path / "ck")]
    if cmd in LINEARS:
        argv += ["--targets", TARGETS, "--ignore", IGNORE]
    a = _parse(argv)
    assert (a.model, a.output, a.overwrite, a.num_calibration_samples, a.max_seq_length, a.seed, a.dtype,
            a.source, a.json) == ("tiny-llama", str(tmp_path / "a"), True, 3, 48, 7, "bfloat16", "wiki", True)
    if cmd in CHECKPOINTS:
        assert a.checkpoint_dir == str(tmp_path / "ck")
    assert capsys.readouterr().err == ""  # the canonical spellings say nothing
    if cmd in LINEARS:
        # Comma lists, a comma inside a regex's {} kept; and they reach the method's config.
        want_t = ["q_proj", "re:mlp\\.(up|down)_proj", "re:layers\\.[0-9]{1,2}\\.self_attn\\.o_proj"]
        want_i = ["re:layers\\.0\\.", "k_proj"]
        assert (a.targets, a.ignore) == (want_t, want_i)
        cfg = a.make_config(a)
        assert (cfg.targets, cfg.ignore) == (want_t, want_i)


@pytest.mark.parametrize("cmd", LINEARS)
def test_targets_default_to_every_decoder_linear(cmd, tmp_path):
    a = _parse(["calibrate", cmd, "--output", str(tmp_path / "a")])
    cfg = a.make_config(a)
    assert cfg.targets is None and cfg.ignore == []


@pytest.mark.parametrize("opt", ["--targets", "--checkpoint-dir"])
def test_double_sparsity_refuses_options_it_would_ignore(opt, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _parse(["calibrate", "double-sparsity", "--output", str(tmp_path / "a"), opt, "x"])
    assert f"unrecognized arguments: {opt}" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", CALIBRATE)
@pytest.mark.parametrize("old,new,dest", [("--n-samples", "--num-calibration-samples", "num_calibration_samples"),
                                          ("--samples", "--num-calibration-samples", "num_calibration_samples"),
                                          ("--seq-len", "--max-seq-length", "max_seq_length")])
def test_old_spellings_still_work_with_a_deprecation_note(cmd, old, new, dest, tmp_path, capsys):
    a = _parse(["calibrate", cmd, "--output", str(tmp_path / "a"), old, "5"])
    assert getattr(a, dest) == 5
    err = capsys.readouterr().err
    assert err == f"accel: note: {old} is deprecated; use {new}\n"
    # `--opt=value` too, and the canonical spelling wins when it comes last.
    a = _parse(["calibrate", cmd, "--output", str(tmp_path / "a"), f"{old}=6", new, "9"])
    assert getattr(a, dest) == 9
    assert capsys.readouterr().err.count("deprecated") == 1


def test_old_spelling_runs_the_command(tmp_path, capsys, monkeypatch):
    """End to end through main(): `calibrate gqsa --samples` (GQSA's old flag) reaches the calibration."""
    seen = {}

    def fake_load(name, dtype="float32", **kw):
        seen["dtype"] = dtype
        raise KeyboardInterrupt  # stop before any work; the spec was built before the load
    monkeypatch.setattr(accel.models, "load", fake_load)
    rc = main(["calibrate", "gqsa", "--output", str(tmp_path / "a"), "--samples", "4", "--seq-len", "64",
               "--dtype", "bfloat16"])
    err = capsys.readouterr().err
    assert rc == 130 and seen["dtype"] == "bfloat16"
    assert "--samples is deprecated; use --num-calibration-samples" in err
    assert "--seq-len is deprecated; use --max-seq-length" in err


def test_calibrate_magnitude_end_to_end_targets_and_ignore_reach_the_artifact(tmp_path, capsys):
    out = tmp_path / "art"
    rc = main(["calibrate", "magnitude", "--model", "tiny-llama", "--output", str(out), "--targets", "re:mlp\\.",
               "--ignore", "down_proj", "--json"])
    assert rc == 0, capsys.readouterr().err
    model = accel.models.tiny("llama")
    with accel.patched(model, out):
        mods = sorted(r["module"] for r in accel.report(model).rows)
    assert mods == sorted(f"model.layers.{i}.mlp.{n}" for i in range(4) for n in ("gate_proj", "up_proj"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no checkpoint directory left behind


class _CharTok:
    """Character-level stand-in for a tokenizer (ids < 512, the tiny models' vocabulary)."""

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        from types import SimpleNamespace

        import torch

        ids = [ord(c) % 512 for c in text]
        return SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)


@pytest.mark.parametrize("cmd,extra", [
    ("gqsa", ["--bqpo-steps", "0", "--init", "rtn", "--allocation", "uniform", "--targets", "q_proj"]),
    ("rsparse", ["--search", "uniform", "--greedy-tokens", "16", "--targets", "q_proj,k_proj"]),
    ("double-sparsity", []),
])
def test_calibrate_end_to_end_through_accel_calibrate(cmd, extra, tmp_path, capsys, monkeypatch):
    """The canonical options drive a real (tiny) calibration: the spec is recorded, the targets are
    the only linears changed, and no checkpoint directory is left behind."""
    import json

    seen = {}

    def load(name, dtype="float32", **kw):
        seen["dtype"] = dtype
        return accel.models.tiny("llama", dtype=getattr(__import__("torch"), dtype)), _CharTok()
    monkeypatch.setattr(accel.models, "load", load)
    out = tmp_path / "art"
    rc = main(["calibrate", cmd, "--model", "tiny-llama", "--output", str(out), "--num-calibration-samples", "2",
               "--max-seq-length", "32", "--seed", "3", "--json"] + extra)
    res = capsys.readouterr()
    assert rc == 0, res.err
    json.loads(res.out.strip().splitlines()[-1])
    c = accel.Artifact.load(out).calibration
    assert (c["source"], c["n_samples"], c["seq_len"], c["seed"]) == ("wiki", 2, 32, 3), c
    assert seen["dtype"] == "float32"
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left[0] == "art" and not any(n.endswith(".partial") for n in left), left
    if cmd != "double-sparsity":
        model = accel.models.tiny("llama")
        with accel.patched(model, out):
            mods = {r["module"].rsplit(".", 1)[-1] for r in accel.report(model).rows}
        assert mods == {"q_proj"} if cmd == "gqsa" else {"q_proj", "k_proj"}


def _defaults_in_help(text: str) -> dict[str, str]:
    """{option: X} for each `  --option ...  help (default: X)` entry of an argparse help text."""
    entries, cur = [], None
    for line in text.splitlines():
        if re.match(r"^  -", line):
            cur = [line.strip()]
            entries.append(cur)
        elif cur is not None and line.startswith("    "):
            cur.append(line.strip())
        else:
            cur = None
    out = {}
    for e in entries:
        flat = re.sub(r"\s+", " ", " ".join(e))
        opt = re.findall(r"--[a-z0-9-]+", e[0].split("  ")[0])  # the option strings, not the help
        m = re.search(r"\(default: ([^)]*)\)$", flat)
        if opt and m:
            out[opt[-1]] = m.group(1)
    return out


@pytest.mark.parametrize("cmd", CALIBRATE)
def test_help_shows_every_default(cmd):
    from accel.calibrate.registry import default_spec

    p = _sub(["calibrate", cmd])
    text = p.format_help()
    shown = _defaults_in_help(text)
    method = {"wanda": "prune", "magnitude": "prune", "dsnot": "prune"}.get(cmd, cmd)
    spec = default_spec(method)
    assert shown["--num-calibration-samples"] == str(spec.n_samples)
    assert shown["--max-seq-length"] == str(spec.seq_len)
    assert shown["--seed"] == str(spec.seed) and shown["--model"] == "smollm2-135m"
    assert "--n-samples" in text and "--seq-len" in text  # the old spellings are named
    for action in p._actions:
        d = action.default
        if not action.option_strings or action.required or d is None or d is False or d == "==SUPPRESS==":
            continue
        if action.help == "==SUPPRESS==":
            continue
        opt = action.option_strings[-1]
        # Either "(default: X)" or the help says the default in words.
        assert opt in shown or "default" in (action.help or "").lower(), (cmd, opt)
        if opt in shown:
            assert shown[opt] == str(d), (cmd, opt, shown[opt], d)


def test_export_help_lists_the_formats(capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    block = out[out.index("formats:"):]
    assert re.search(r"^\s+hf\s+accel HF checkpoint", block, re.M)
    assert re.search(r"^\s+hf-dense\s+plain HF checkpoint", block, re.M)
    assert re.search(r"^\s+sglang-ds\s+SGLang", block, re.M)


def test_one_command_registry():
    """accel/cli.py lists every command module; there is no second list and no stray append."""
    import accel.cli as cli_mod

    p = build()
    assert sorted(p.groups["calibrate"].choices) == sorted(CALIBRATE + ["recipe"])  # recipe: tests/test_recipe_yaml.py
    assert sorted(p.groups["bench"].choices) == ["decode", "ds-attention", "ds-offload", "gqsa-gemv",
                                                 "rsparse-linear"]
    assert sorted(p.groups["eval"].choices) == ["ds-retrieval", "ds-sweep", "gqsa-sweep", "matrix", "matrix-merge",
                                                "ppl", "prune-sweep", "rsparse-sweep"]
    assert "demo" in p.sub.choices
    assert all(m.endswith("_cli") or m == "accel.eval.cli" for m in cli_mod.COMMAND_MODULES)
    with pytest.raises(ImportError):
        import accel.calibrate.cli  # noqa: F401  (the second registry is gone)
    with pytest.raises(ValueError, match="unknown command group ''"):
        p.add("", "x", "a top-level command goes through cli.command")


# --------------------------------------------------------------------------------------------
# accel.report totals, against bytes computed by hand for the tiny llama
# (hidden 64, intermediate 128, 4 layers, 4 heads x 16, 2 KV heads; no biases)
# --------------------------------------------------------------------------------------------
def test_report_totals_gqsa_bytes_by_hand():
    from accel.calibrate.gqsa import rtn_artifact
    from accel.configs.gqsa import GQSAConfig

    model = accel.models.tiny("llama")
    art = rtn_artifact(model, GQSAConfig(bits=4, sparsity=0.5, group_size=16, targets=["q_proj"]))
    with accel.patched(model, art):
        rep = accel.report(model)
        t = rep.totals()
        text = str(rep)
    # q_proj 64 -> 64: 4 groups of 16 per row, 2 kept. Codes 2 x 16 x 4 bit = 16 B/row, colmask
    # ceil(4/8) = 1 B/row, fp16 scale + zero per kept group = 8 B/row: 25 B x 64 rows = 1600 B.
    # Dense bf16: 64 x 64 x 2 = 8192 B. Four layers.
    assert (t.linears, t.weight_bytes, t.dense_bf16_bytes) == (4, 4 * 1600, 4 * 8192)
    assert t.ratio == pytest.approx(1600 / 8192)
    assert sum(t.kernels.values()) == 4 and len(t.kernels) == 1
    assert "total: 4 linears store 6,400 bytes vs 32,768 dense bf16 (0.195x)" in text
    assert text.splitlines()[-1] == f"modules per kernel path: {next(iter(t.kernels))} 4"


def test_report_totals_prune_fp32_is_twice_bf16(tmp_path):
    from accel.calibrate.prune_cli import calibrate_prune

    calibrate_prune(str(tmp_path / "art"), init="magnitude", model=accel.models.tiny("llama"),
                    model_name="tiny-llama", sparsity=0.5, targets=["re:mlp\\."], progress=False)
    model = accel.models.tiny("llama")  # fp32: a masked dense weight stores 4 bytes a weight
    with accel.patched(model, tmp_path / "art"):
        t = accel.report(model).totals()
        text = str(accel.report(model))
    # gate/up 64 -> 128 and down 128 -> 64: 3 x 8192 weights a layer, 4 layers = 98,304 weights.
    assert (t.linears, t.weight_bytes, t.dense_bf16_bytes) == (12, 98304 * 4, 98304 * 2)
    assert t.ratio == 2.0 and t.kernels == {"dense-masked": 12}
    assert text.splitlines()[-2:] == ["total: 12 linears store 393,216 bytes vs 196,608 dense bf16 (2.000x)",
                                      "modules per kernel path: dense-masked 12"]


def test_report_of_an_unpatched_model_has_no_totals():
    model = accel.models.tiny("llama")
    rep = accel.report(model)
    assert str(rep) == "model is not patched by accel"
    t = rep.totals()
    assert (t.linears, t.weight_bytes, t.kernels, t.ratio) == (0, 0, {}, None)


# The eval commands that calibrate spell the calibration options like `accel calibrate`, and
# their old spellings still work with a note.
SWEEP_OLD = [("prune-sweep", "--n-samples", "--num-calibration-samples"),
             ("prune-sweep", "--calib-seq-len", "--max-seq-length"),
             ("gqsa-sweep", "--samples", "--num-calibration-samples"),
             ("gqsa-sweep", "--calib-seq-len", "--max-seq-length"),
             ("ds-sweep", "--calib-samples", "--num-calibration-samples"),
             ("ds-retrieval", "--calib-samples", "--num-calibration-samples"),
             ("rsparse-sweep", "--n-samples", "--num-calibration-samples")]


@pytest.mark.parametrize("cmd,old,new", SWEEP_OLD, ids=[f"{c}{o}" for c, o, _ in SWEEP_OLD])
def test_sweeps_share_the_calibration_spellings(cmd, old, new, capsys):
    from accel.cli import build

    parser = build().parser
    dest = new.lstrip("-").replace("-", "_")
    assert getattr(parser.parse_args(["eval", cmd, new, "7"]), dest) == 7
    capsys.readouterr()
    assert getattr(parser.parse_args(["eval", cmd, old, "7"]), dest) == 7
    assert f"{old} is deprecated; use {new}" in capsys.readouterr().err
