"""`accel-lm-eval` / `python -m accel.eval.lm_eval_cli`: lm-eval's own CLI, with the "accel" model
registered and accel's offline tasks on the include path."""
from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from . import lm_eval_glue  # noqa: F401  (registers "accel")

    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        argv += ["--include_path", lm_eval_glue.TASKS_DIR]
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval"] + argv
    cli_evaluate()


if __name__ == "__main__":
    main()
