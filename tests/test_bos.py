"""BOS follows the tokenizer: calibration samples, perplexity windows and lm-eval put the BOS a
tokenizer adds (Gemma's) at the start of each sample / window / document, and nothing when it adds
none (SmolLM2's, Qwen's). Mechanics on a tiny model with a real word-level HF tokenizer; the
real-model numbers are in tests/test_models_qwen_gemma_real.py."""
import math

import pytest
import torch

import accel
from accel import data
from accel.eval.perplexity import perplexity

BOS, EOS = 1, 2


def _tokenizer(add_bos: bool):
    """A real PreTrainedTokenizerFast: whitespace words from a 500-word vocab (others -> <unk>),
    with a post-processor that puts <s> before each text when add_bos."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in data.texts("wiki", "evaluation")[:40] for w in t.split()})[:497]
    vocab = {"<unk>": 0, "<s>": BOS, "</s>": EOS, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def toks():
    return _tokenizer(True), _tokenizer(False)


def test_bos_token_id_asks_the_tokenizer(toks):
    with_bos, without = toks
    assert with_bos("a b").input_ids[0] == BOS and without("a b").input_ids[0] != BOS
    assert data.bos_token_id(with_bos) == BOS
    assert data.bos_token_id(without) is None


def test_calibration_samples_lead_with_bos_only_when_the_tokenizer_adds_one(toks):
    with_bos, without = toks
    plain = data.calibration_samples(without, n_samples=3, seq_len=16, seed=0)
    led = data.calibration_samples(with_bos, n_samples=3, seq_len=16, seed=0)
    assert plain.shape == led.shape == (3, 16)
    assert (led[:, 0] == BOS).all() and not (plain == BOS).any()
    # Same stream (same vocab, same seed): BOS + the next 15 stream tokens per row.
    assert torch.equal(led[:, 1:].reshape(-1), plain.reshape(-1)[:45])
    t = data.samples_from_texts(with_bos, ["a b c " * 20], 2, 8)
    assert (t[:, 0] == BOS).all() and not (t[:, 1:] == BOS).any()
    assert data.samples_from_texts(without, ["a b c " * 20], None, 8).shape == (7, 8)  # 60 tokens // 8
    assert data.samples_from_texts(with_bos, ["a b c " * 20], None, 8).shape == (8, 8)  # 60 // 7


def _direct_nll(model, rows):
    """Sum of -log p(token) for every position after the first of each row, with plain forwards."""
    total, n = 0.0, 0
    for r in rows:
        x = torch.tensor([r])
        with torch.no_grad():
            logp = model(x).logits[0, :-1].double().log_softmax(-1)
        total -= float(logp.gather(1, x[0, 1:, None]).sum())
        n += len(r) - 1
    return total, n


def test_perplexity_windows_start_with_bos_and_never_score_it():
    model = accel.models.tiny("llama")
    ids = torch.arange(3, 3 + 100) % 500 + 3  # 100 text tokens, none of them BOS
    res = perplexity(model, ids, seq_len=16, progress=False, bos_token_id=BOS)
    # 100 // 15 = 6 windows of BOS + 15 text tokens; every text token is predicted, BOS never is.
    rows = [[BOS] + ids[i * 15:(i + 1) * 15].tolist() for i in range(6)]
    nll, n = _direct_nll(model, rows)
    assert (res.windows, res.tokens, res.bos_token_id) == (6, 90, BOS)
    assert res.ppl == pytest.approx(math.exp(nll / n), rel=1e-4)
    # Without BOS the protocol is as before: 6 windows of 16 text tokens, the first of each unscored.
    plain = perplexity(model, ids, seq_len=16, progress=False, bos_token_id=None)
    nll, n = _direct_nll(model, [ids[i * 16:(i + 1) * 16].tolist() for i in range(6)])
    assert (plain.windows, plain.tokens) == (6, 90) and plain.ppl == pytest.approx(math.exp(nll / n), rel=1e-4)
    # "auto" (the default) reads what accel.models.load recorded from the tokenizer.
    assert perplexity(model, ids, seq_len=16, progress=False).ppl == pytest.approx(plain.ppl, rel=1e-6)
    model.config.accel_bos_token_id = BOS
    assert perplexity(model, ids, seq_len=16, progress=False).ppl == pytest.approx(res.ppl, rel=1e-6)
    with pytest.raises(data.DataError, match="bos_token_id"):
        perplexity(model, ids, seq_len=16, progress=False, bos_token_id="yes")


def test_load_records_the_tokenizers_bos(monkeypatch, tmp_path, toks):
    with_bos, without = toks
    model = accel.models.tiny("llama")
    model.save_pretrained(tmp_path / "m")
    with_bos.save_pretrained(tmp_path / "m")
    m, _ = accel.models.load(str(tmp_path / "m"))
    assert m.config.accel_bos_token_id == BOS
    without.save_pretrained(tmp_path / "m")
    m, _ = accel.models.load(str(tmp_path / "m"))
    assert m.config.accel_bos_token_id is None


def test_lm_eval_glue_one_bos_per_document_and_context(monkeypatch, toks):
    from lm_eval.api.instance import Instance

    from accel.eval import lm_eval_glue

    with_bos, _ = toks
    model = accel.models.tiny("llama")
    monkeypatch.setattr(accel.models, "load", lambda name, dtype=None: (model, with_bos))
    lm = lm_eval_glue.AccelLM(pretrained="tiny", max_length=64, batch_size=1)
    text = " ".join(data.texts("wiki", "evaluation")[0].split()[:30])
    # Log-likelihood contexts get the tokenizer's BOS, as the model saw in training.
    assert lm.tok_encode(text)[0] == BOS
    # Rolling perplexity: lm-eval's own prefix token is the BOS; a second one would be scored.
    req = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    (got,) = lm.loglikelihood_rolling([req], disable_tqdm=True)
    body = with_bos(text, add_special_tokens=False).input_ids
    nll, n = _direct_nll(model, [[BOS] + body])
    assert n == len(body) and got == pytest.approx(-nll, rel=1e-4)


def test_perplexity_caps_the_batch_by_logits_bytes(monkeypatch):
    # Gemma's 262K vocab: 4 windows x 2048 positions of logits are 4.3 GB in bf16 (8.6 GB as fp32
    # for the loss); the batch is cut so that the logits stay under a byte budget.
    from accel.eval import perplexity as P

    model = accel.models.tiny("llama")
    ids = torch.arange(200) % 500 + 3
    ref = perplexity(model, ids, seq_len=16, batch_size=1, progress=False, bos_token_id=None)
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[0]), with_kwargs=True)
    monkeypatch.setattr(P, "LOGITS_BUDGET_BYTES", 2 * 16 * 512 * 4, raising=False)  # two windows' fp32 logits
    r = perplexity(model, ids, seq_len=16, batch_size=8, progress=False, bos_token_id=None)
    assert max(seen) == 2 and r.windows == 12 and r.ppl == pytest.approx(ref.ppl, rel=1e-5)


def test_auto_bos_without_the_loaders_record_warns(caplog):
    """A model loaded without accel.models.load has no recorded BOS: "auto" scores it without one,
    which is wrong for Gemma; that must not be silent."""
    import logging

    model = accel.models.tiny("gemma3")
    assert not hasattr(model.config, "accel_bos_token_id")
    ids = torch.arange(1, 101) % 500
    with caplog.at_level(logging.WARNING, logger="accel.eval.perplexity"):
        res = perplexity(model, ids, seq_len=16, progress=False)
    assert res.bos_token_id is None
    msg = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "bos_token_id=" in msg and "needs" in msg and "BOS" in msg, msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="accel.eval.perplexity"):
        perplexity(model, ids, seq_len=16, progress=False, bos_token_id=None)  # said explicitly: no warning
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
