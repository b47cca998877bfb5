"""lm-eval integration: `@register_model("accel")`, a HFLM over an accel-loaded (and patched) model.

    accel-lm-eval --model accel --model_args pretrained=smollm2-135m,artifact=DIR \
        --tasks accel_wiki_mc,accel_wiki_ppl --limit 20

(`python -m accel.eval.lm_eval_cli ...` is the same.) The plain `lm_eval` CLI cannot see models
registered outside its package, hence the wrapper; from Python, `import accel.eval.lm_eval_glue`
and pass `model="accel"` to `lm_eval.simple_evaluate`, or build `AccelLM(...)` directly.
"""
from __future__ import annotations

import os

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")


@register_model("accel")
class AccelLM(HFLM):
    def __init__(self, pretrained: str = "smollm2-135m", artifact: str | None = None, dtype: str = "float32",
                 max_length: int = 1024, batch_size: int | str = 8, **kwargs):
        import accel
        from accel.data import bos_token_id

        model, tok = accel.models.load(pretrained, dtype=dtype)
        if artifact:
            accel.patch(model, artifact)
        self.accel_artifact = artifact
        self._in_rolling = False
        # BOS as the tokenizer says (Gemma: yes; SmolLM2, Qwen: no), stated explicitly so that
        # lm-eval does not guess it from a model name.
        kwargs.setdefault("add_bos_token", bos_token_id(tok) is not None)
        # max_length: without it HFLM uses max_position_embeddings (8192) as the rolling window.
        super().__init__(pretrained=model, tokenizer=tok, max_length=int(max_length),
                         batch_size=batch_size, **kwargs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        # lm-eval already puts prefix_token_id (the BOS, when there is one) before each document;
        # a second BOS from tok_encode would be scored as the document's first token.
        self._in_rolling = True
        try:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        finally:
            self._in_rolling = False

    def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
        if self._in_rolling and add_special_tokens is None:
            add_special_tokens = False
        return super().tok_encode(string, add_special_tokens=add_special_tokens,
                                  left_truncate_len=left_truncate_len, **kwargs)


def task_manager(extra_include: str | None = None):
    from lm_eval.tasks import TaskManager

    paths = [TASKS_DIR] + ([extra_include] if extra_include else [])
    return TaskManager(include_path=paths)
