"""lm-eval glue: accel's offline tasks run through the registered "accel" model.

The expected numbers are computed here from plain forward passes of the same model (the prompt,
the rolling windows and the metrics written out from lm-eval's definitions), not by the glue or
by lm-eval, so a wrong prompt, window, model or metric shows up as a different number."""
import math
import re

import pytest
import torch

MAX_LEN = 512
LIMIT = 4
MC_PROMPT = 'Question: Which short description fits the Wikipedia article "{}"?\nAnswer:'


def _continuation_logprob(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context): the whole string is tokenized and split after the context's
    tokens (lm-eval's rule for causal models)."""
    ctx = tok.encode(context)
    whole = tok.encode(context + continuation)
    assert whole[:len(ctx)] == ctx
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = model(ids).logits[0, :-1].double().log_softmax(-1)
    targets = ids[0, len(ctx):]
    return float(logp[len(ctx) - 1:].gather(1, targets[:, None]).sum())


def _rolling_logprob(model, tok, text: str) -> float:
    """Sum of log p over every token of `text`, with the prefix token (BOS, else EOS) in front:
    the tokens are predicted MAX_LEN at a time, each chunk from the MAX_LEN tokens before its end."""
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    seq = [prefix] + tok.encode(text)
    total = 0.0
    for start in range(1, len(seq), MAX_LEN):
        end = min(start + MAX_LEN, len(seq))
        lo = max(0, end - 1 - MAX_LEN)
        ids = torch.tensor([seq[lo:end]])
        with torch.no_grad():
            logp = model(ids[:, :-1]).logits[0].double().log_softmax(-1)
        n = end - start  # score the last n positions only
        total += float(logp[-n:].gather(1, ids[0, -n:, None]).sum())
    return total


@pytest.mark.slow
def test_local_tasks_match_direct_forward_passes(tmp_path):
    import lm_eval
    from lm_eval.api.registry import get_model

    import accel
    from accel.artifact import Artifact
    from accel.eval import lm_eval_glue

    # An identity artifact exercises the artifact= model arg end to end.
    model, _ = accel.models.load("smollm2-135m")
    Artifact.for_model(model, accel.IdentityConfig()).save(tmp_path / "art")
    del model

    assert get_model("accel") is lm_eval_glue.AccelLM
    lm = lm_eval_glue.AccelLM(pretrained="smollm2-135m", artifact=str(tmp_path / "art"), max_length=MAX_LEN,
                              batch_size=4)
    assert accel.is_patched(lm.model)
    res = lm_eval.simple_evaluate(model=lm, tasks=["accel_wiki_mc", "accel_wiki_ppl"],
                                  task_manager=lm_eval_glue.task_manager(), limit=LIMIT, log_samples=True)
    r, samples = res["results"], res["samples"]
    model, tok = lm.model, lm.tokenizer

    # Multiple choice: one log-likelihood per choice, then acc = argmax hits the label,
    # acc_norm = argmax of log-likelihood per character of the choice.
    mc = samples["accel_wiki_mc"]
    assert len(mc) == LIMIT
    hits, hits_norm = [], []
    for s in mc:
        doc = s["doc"]
        lls = [_continuation_logprob(model, tok, MC_PROMPT.format(doc["title"]), " " + c) for c in doc["choices"]]
        got = [ll for ll, _greedy in s["filtered_resps"]]
        assert got == pytest.approx(lls, abs=2e-3, rel=1e-4), doc["title"]
        hits.append(max(range(4), key=lambda i: lls[i]) == doc["label"])
        hits_norm.append(max(range(4), key=lambda i: lls[i] / len(doc["choices"][i])) == doc["label"])
    assert r["accel_wiki_mc"]["acc,none"] == pytest.approx(sum(hits) / LIMIT, abs=1e-12)
    assert r["accel_wiki_mc"]["acc_norm,none"] == pytest.approx(sum(hits_norm) / LIMIT, abs=1e-12)

    # Rolling perplexity: exp(-sum log p / sum words), words as lm-eval's wikitext counts them.
    ppl = samples["accel_wiki_ppl"]
    assert len(ppl) == LIMIT
    ll = [_rolling_logprob(model, tok, s["doc"]["page"]) for s in ppl]
    words = sum(len(re.split(r"\s+", s["doc"]["page"])) for s in ppl)
    nbytes = sum(len(s["doc"]["page"].encode("utf-8")) for s in ppl)
    assert r["accel_wiki_ppl"]["word_perplexity,none"] == pytest.approx(math.exp(-sum(ll) / words), rel=1e-4)
    assert r["accel_wiki_ppl"]["byte_perplexity,none"] == pytest.approx(math.exp(-sum(ll) / nbytes), rel=1e-4)
    assert r["accel_wiki_ppl"]["bits_per_byte,none"] == pytest.approx(-sum(ll) / nbytes / math.log(2), rel=1e-4)
