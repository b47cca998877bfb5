"""Bad input to calibration data and calibration runs: each case raises the exact accel error
class, with a message naming the problem, and writes nothing (the tmp dir is unchanged)."""
import hashlib
import re
from types import SimpleNamespace

import pytest
import torch

import accel
import accel.data as D
from accel.artifact import ArtifactError
from accel.calibrate.double_sparsity import calibrate_double_sparsity
from accel.calibrate.gqsa import calibrate_gqsa
from accel.calibrate.prune import prune_model
from accel.calibrate.prune_cli import calibrate_prune
from accel.calibrate.rsparse import calibrate_rsparse, collect_stats
from accel.calibrate.runner import CalibrationError, run_layerwise
from accel.configs import ConfigError
from accel.configs.gqsa import GQSAConfig
from accel.configs.prune import PruneConfig
from accel.configs.rsparse import RSparseConfig
from accel.data import CalibrationSpec, DataError
from accel.patches.core import UnsupportedModelError

NAN_LINEAR = "model.layers.1.mlp.down_proj"


class CharTok:
    """Character-level stand-in for a tokenizer (ids < 512, the tiny models' vocabulary)."""

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = [ord(c) % 512 for c in text]
        return SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)


def x(n=2, L=16, dtype=torch.long):
    return torch.randint(0, 512, (n, L), generator=torch.Generator().manual_seed(42)).to(dtype)


def llama():
    return accel.models.tiny("llama")


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).eval()


def bert():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=64, max_position_embeddings=32)).eval()


def nan_llama(value=float("nan")):
    m = llama()
    with torch.no_grad():
        m.get_submodule(NAN_LINEAR).weight[3, 5] = value
    return m


def short_llama():
    m = llama()
    m.config.max_position_embeddings = 8
    return m


GQSA = dict(bits=4, sparsity=0.5, group_size=16, allocation="uniform", bqpo_steps=1)


def _calib(method, model, t, samples=None, seq_len=16, **kw):
    """Run calibration `method` on `model`, writing (if at all) under t."""
    out = str(t / "art")
    if method in ("wanda", "magnitude", "dsnot"):
        init = "magnitude" if method == "magnitude" else "wanda"
        return calibrate_prune(out, init=init, dsnot=method == "dsnot", model=model, tokenizer=CharTok(),
                               samples=samples, seq_len=seq_len, n_samples=2, model_name="tiny-llama",
                               progress=False, max_cycles=2, **kw)
    if method == "gqsa":
        spec = CalibrationSpec(n_samples=2, seq_len=seq_len)
        return calibrate_gqsa(model, CharTok(), GQSAConfig(**{**GQSA, **kw}), spec, checkpoint_dir=t / "ck",
                              progress=False, samples=samples)
    if method == "ds":
        return calibrate_double_sparsity(model, CharTok(), n_samples=2, seq_len=seq_len, progress=False,
                                         samples=samples)
    if method == "rsparse":
        if samples is not None:
            return collect_stats(model, samples, RSparseConfig(sparsity=0.5), grid=(0.0, 0.5),
                                 greedy_tokens=16, checkpoint_dir=t / "ck", progress=False)
        return calibrate_rsparse(model, CharTok(), RSparseConfig(sparsity=0.5, search="uniform"), n_samples=2,
                                 seq_len=seq_len, checkpoint_dir=t / "ck", progress=False)
    raise AssertionError(method)


def _user_dir(name):
    def setup(t):
        d = t / name
        d.mkdir()
        (d / "notes.txt").write_text("the user's own file")
    return setup


def _write(name, data=b"not accel's"):
    def setup(t):
        (t / name).parent.mkdir(parents=True, exist_ok=True)
        (t / name).write_bytes(data)
    return setup


def _an_artifact(t):
    from accel.artifact import Artifact
    from accel.configs import IdentityConfig

    Artifact.for_model(llama(), [IdentityConfig()]).save(t / "art")


def _runner_direct_gpt2(t):
    class Noop:
        def process_layer(self, i, layer, data):
            return {}

        def restore_layer(self, i, layer, tensors):
            pass
    run_layerwise(gpt2(), x(L=8) % 64, Noop(), checkpoint_dir=t / "ck", progress=False)


def _ppl_too_long(t):
    from accel.eval.perplexity import perplexity

    perplexity(short_llama(), torch.randint(0, 512, (64,)), seq_len=16, progress=False)


def _data(monkeypatch_texts=None, **spec):
    def run(t, monkeypatch):
        if monkeypatch_texts is not None:
            monkeypatch.setattr(D, "texts", lambda *a, **k: monkeypatch_texts)
        D.calibration_samples(CharTok(), CalibrationSpec(**spec))
    return run


TOO_LONG = r"seq_len=16 exceeds the model's max_position_embeddings=8"
# id -> (fn(tmp_path, monkeypatch), error class, message regex)
CASES = {
    # calibration data
    "data-n_samples-0": (_data(n_samples=0), DataError, "n_samples"),
    "data-n_samples-negative": (_data(n_samples=-3), DataError, "n_samples"),
    "data-n_samples-str": (_data(n_samples="8"), DataError, "n_samples"),
    "data-seq_len-0": (_data(seq_len=0), DataError, "seq_len"),
    "data-seq_len-negative": (_data(seq_len=-1), DataError, "seq_len"),
    "data-seq_len-1": (_data(seq_len=1), DataError, "seq_len"),
    "data-seq_len-float": (_data(seq_len=16.0), DataError, "seq_len"),
    "data-empty-source": (_data([], n_samples=2, seq_len=8), DataError, "empty"),
    "data-blank-texts": (_data(["", "  "], n_samples=2, seq_len=8), DataError, "empty"),
    "data-too-short-text": (_data(["ab"], n_samples=2, seq_len=8), DataError, r"only \d+ tokens.*2 x 8"),
    "data-unknown-source": (_data(source="nope", n_samples=2, seq_len=8), DataError, "unknown data source 'nope'"),
    # calibration samples given directly
    "samples-float-dtype": (lambda t, m: _calib("wanda", llama(), t, samples=x(dtype=torch.float32)),
                            CalibrationError, "integer token ids.*float32"),
    "samples-bool-dtype": (lambda t, m: _calib("gqsa", llama(), t, samples=x() > 3),
                           CalibrationError, "integer token ids.*bool"),
    "samples-1d": (lambda t, m: _calib("wanda", llama(), t, samples=x()[0]), CalibrationError, r"\[N, L\]"),
    "samples-empty": (lambda t, m: _calib("dsnot", llama(), t, samples=x(n=0)), CalibrationError, "non-empty"),
    "samples-list": (lambda t, m: prune_model(llama(), PruneConfig(), [[1, 2, 3]], progress=False),
                     CalibrationError, "torch.Tensor"),
    "samples-id-past-vocab": (lambda t, m: _calib("wanda", llama(), t, samples=x() + 512),
                              CalibrationError, r"vocab_size=512\), got ids from 5\d\d"),
    "samples-negative-id": (lambda t, m: _calib("rsparse", llama(), t, samples=x() - 600),
                            CalibrationError, r"\[0, vocab_size=512\)"),
    "samples-seq_len-1-wanda": (lambda t, m: _calib("wanda", llama(), t, samples=x(L=1)),
                                CalibrationError, "seq_len >= 2"),
    "samples-ds-float": (lambda t, m: _calib("ds", llama(), t, samples=x(dtype=torch.float64)),
                         CalibrationError, "integer token ids"),
    # sequence length past max_position_embeddings
    "too-long-prune-samples": (lambda t, m: _calib("wanda", short_llama(), t, samples=x()), CalibrationError, TOO_LONG),
    "too-long-prune-spec": (lambda t, m: _calib("dsnot", short_llama(), t), CalibrationError, TOO_LONG),
    "too-long-gqsa": (lambda t, m: _calib("gqsa", short_llama(), t), CalibrationError, TOO_LONG),
    "too-long-ds": (lambda t, m: _calib("ds", short_llama(), t), CalibrationError, TOO_LONG),
    "too-long-rsparse": (lambda t, m: _calib("rsparse", short_llama(), t), CalibrationError, TOO_LONG),
    "too-long-eval-ppl": (lambda t, m: _ppl_too_long(t), DataError, TOO_LONG),
    "seq_len-0-gqsa": (lambda t, m: _calib("gqsa", llama(), t, seq_len=0), CalibrationError, "seq_len"),
    # unsupported architectures: the same check (and error) as accel.patch
    **{f"unsupported-gpt2-{meth}": ((lambda meth: lambda t, m: _calib(meth, gpt2(), t, samples=x() % 64))(meth),
                                    UnsupportedModelError, "'gpt2'")
       for meth in ("wanda", "magnitude", "dsnot", "gqsa", "ds", "rsparse")},
    **{f"unsupported-bert-{meth}": ((lambda meth: lambda t, m: _calib(meth, bert(), t))(meth),
                                    UnsupportedModelError, "'bert'")
       for meth in ("wanda", "gqsa", "ds", "rsparse")},
    "unsupported-gpt2-runner": (lambda t, m: _runner_direct_gpt2(t), UnsupportedModelError, "'gpt2'"),
    # non-finite weights
    **{f"nan-weight-{meth}": ((lambda meth: lambda t, m: _calib(meth, nan_llama(), t, samples=x()))(meth),
                              CalibrationError, re.escape(NAN_LINEAR) + r"\.weight holds 1 NaN/inf")
       for meth in ("magnitude", "wanda", "dsnot", "gqsa", "rsparse", "ds")},
    "inf-weight-magnitude": (lambda t, m: _calib("magnitude", nan_llama(float("inf")), t),
                             CalibrationError, re.escape(NAN_LINEAR)),
    "nan-embedding-wanda": (lambda t, m: _nan_embedding(t), CalibrationError, "embeddings"),
    # GQSA sparsity no row can reach (every row keeps one group)
    "gqsa-sparsity-0.99": (lambda t, m: _calib("gqsa", llama(), t, samples=x(), sparsity=0.99),
                           ConfigError, r"sparsity=0.99 is not reachable.*stops at 0.7500"),
    # checkpoint directories
}

WANDA = lambda t, m: _calib("wanda", llama(), t, samples=x())  # noqa: E731
GQSA_RUN = lambda t, m: _calib("gqsa", llama(), t, samples=x())  # noqa: E731
# id -> (setup(tmp_path): the files already there, fn, error class, message regex)
FILE_CASES = {
    # checkpoint directories: accel never deletes or reuses what it did not write
    "ckpt-user-dir-gqsa": (_user_dir("ck"), GQSA_RUN, CalibrationError, "not an accel checkpoint directory.*notes.txt"),
    "ckpt-user-dir-prune-partial": (_user_dir("art.partial"), WANDA, CalibrationError, "notes.txt"),
    "ckpt-user-dir-rsparse": (_user_dir("ck"), lambda t, m: _calib("rsparse", llama(), t, samples=x()),
                              CalibrationError, "notes.txt"),
    "ckpt-is-a-file": (_write("ck"), GQSA_RUN, CalibrationError, "is an existing file"),
    "ckpt-layers-without-key": (_write("ck/layer_000.safetensors"), GQSA_RUN, CalibrationError, "run_key.json"),
    "prune-partial-is-a-file": (_write("art.partial"), WANDA, CalibrationError, r"art\.partial.*existing file"),
    # output conflicts, found before calibrating
    "output-is-a-file": (_write("art", b"thesis"), WANDA, ArtifactError, "is a file"),
    "output-is-user-dir": (_user_dir("art"), lambda t, m: _calib("magnitude", llama(), t), ArtifactError,
                           "not an accel artifact"),
    "output-is-artifact-no-overwrite": (_an_artifact, WANDA, ArtifactError, "--overwrite"),
    "output-parent-is-a-file": (_write("f"), lambda t, m: calibrate_prune(str(t / "f" / "art"), model=llama(),
                                                                          samples=x(), progress=False),
                                ArtifactError, "not a directory"),
}


def _nan_embedding(t):
    m = llama()
    with torch.no_grad():
        m.model.embed_tokens.weight.fill_(float("nan"))
    _calib("wanda", m, t, samples=x())


def _snapshot(root):
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def test_enough_cases():
    assert len(CASES) + len(FILE_CASES) >= 25


@pytest.mark.parametrize("case", list(CASES) + list(FILE_CASES))
def test_bad_calibration_input(case, tmp_path, monkeypatch):
    if case in FILE_CASES:
        setup, fn, cls, pattern = FILE_CASES[case]
        setup(tmp_path)
    else:
        fn, cls, pattern = CASES[case]
    before = _snapshot(tmp_path)
    with pytest.raises(Exception) as ei:
        fn(tmp_path, monkeypatch)
    assert type(ei.value) is cls, f"{type(ei.value).__name__}: {ei.value}"
    assert re.search(pattern, str(ei.value), re.S), str(ei.value)
    assert _snapshot(tmp_path) == before  # nothing written, nothing deleted


def test_gqsa_sparsity_rounded_to_whole_groups_warns_and_records_what_it_reached(caplog):
    # 64 and 128 input features at g16: 4 and 8 groups per row; 0.3 of them rounds to 1 and 2,
    # so every linear prunes exactly 0.25 of its weights.
    model = llama()
    with caplog.at_level("WARNING", logger="accel.calibrate.gqsa"):
        art = calibrate_gqsa(model, None, GQSAConfig(**{**GQSA, "sparsity": 0.3}),
                             CalibrationSpec(n_samples=2, seq_len=16), progress=False, samples=x())
    assert "sparsity=0.3000 becomes 0.2500" in caplog.text, caplog.text
    assert art.calibration["sparsity_requested"] == 0.3 and art.calibration["model_sparsity"] == 0.25


def test_gqsa_reachable_sparsity_is_silent(caplog):
    with caplog.at_level("WARNING", logger="accel.calibrate.gqsa"):
        art = calibrate_gqsa(llama(), None, GQSAConfig(**GQSA), CalibrationSpec(n_samples=2, seq_len=16),
                             progress=False, samples=x())
    assert "becomes" not in caplog.text and art.calibration["model_sparsity"] == 0.5
