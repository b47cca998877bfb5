"""lm-eval glue: accel's offline tasks run through the registered "accel" model."""
import math

import pytest


@pytest.mark.slow
def test_local_tasks_run_offline_through_registered_model(tmp_path):
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
    lm = lm_eval_glue.AccelLM(pretrained="smollm2-135m", artifact=str(tmp_path / "art"), max_length=512,
                              batch_size=4)
    assert accel.is_patched(lm.model)
    res = lm_eval.simple_evaluate(model=lm, tasks=["accel_wiki_mc", "accel_wiki_ppl"],
                                  task_manager=lm_eval_glue.task_manager(), limit=4, log_samples=False)
    r = res["results"]
    assert 0.0 <= r["accel_wiki_mc"]["acc,none"] <= 1.0
    wp = r["accel_wiki_ppl"]["word_perplexity,none"]
    assert math.isfinite(wp) and 1 < wp < 500
