"""Text data: disjoint splits, seeded calibration samples, clear errors."""
import pytest
import torch

from accel import data


class _CharTok:
    """A stand-in tokenizer (one id per character) so these tests need no model."""

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = [ord(c) % 5000 for c in text]

        class R:
            input_ids = torch.tensor([ids]) if return_tensors == "pt" else ids
        return R()


def test_splits_are_disjoint_and_cover_corpus():
    ev = {t for t, _ in data.wiki_split("evaluation")}
    cal = {t for t, _ in data.wiki_split("calibration")}
    assert ev and cal and not ev & cal
    assert len(ev) + len(cal) == len(data.wiki_articles())
    assert 0.15 < len(ev) / (len(ev) + len(cal)) < 0.25


def test_calibration_samples_seeded_and_from_calibration_split():
    tok = _CharTok()
    a = data.calibration_samples(tok, n_samples=4, seq_len=64, seed=0)
    b = data.calibration_samples(tok, n_samples=4, seq_len=64, seed=0)
    c = data.calibration_samples(tok, n_samples=4, seq_len=64, seed=1)
    assert a.shape == (4, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    text = "".join(chr(int(i)) for i in a[0])
    assert text in "\n\n".join(t for _, t in data.wiki_split("calibration"))
    assert text not in data.eval_text("wiki")


def test_eval_tokens_length_and_errors():
    tok = _CharTok()
    assert data.eval_tokens(tok, "wiki", 1000).shape == (1000,)
    with pytest.raises(data.DataError, match="unknown data source"):
        data.eval_tokens(tok, "nope", 10)
    with pytest.raises(data.DataError, match="positive"):
        data.eval_tokens(tok, "wiki", 0)
    with pytest.raises(data.DataError, match="only"):
        data.calibration_samples(tok, n_samples=10**5, seq_len=1024)
    with pytest.raises(data.DataError, match="n_samples"):
        data.calibration_samples(tok, n_samples=0, seq_len=16)


def test_online_dataset_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(data.DataError, match="wikitext2"):
        data.eval_text("wikitext2")
