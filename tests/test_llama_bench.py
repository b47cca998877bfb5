"""`accel bench decode --llama-bench PATH` (issue 19): reading llama.cpp's `llama-bench -o json`.

A fake llama-bench (a Python script) prints what llama-bench 0c1e570 prints for `-p P -n N -o json`:
a JSON array holding one test object for the prompt run (n_prompt=P, n_gen=0) and one for the
generation run (n_prompt=0, n_gen=N), fields trimmed to those that matter here.
"""
import json
import os
import stat
import sys

import pytest

from accel.errors import AccelError
from eval.bench_decode import run_llama_bench

# Per thread count: (prefill tok/s, decode tok/s) the fake reports.
FIGURES = {1: (49.6, 17.6), 2: (91.25, 30.5)}

FAKE = """#!{python}
import json, sys
a = sys.argv[1:]
opt = {{a[i]: a[i + 1] for i in range(0, len(a) - 1) if a[i].startswith("-")}}
assert opt["-o"] == "json", a
t, p, n = int(opt["-t"]), int(opt["-p"]), int(opt["-n"])
figures = {figures}
base = {{"build_commit": "0c1e570", "cpu_info": "Intel(R) Xeon(R) Processor", "backends": "CPU",
         "model_type": "llama 256M Q4_1", "n_threads": t, "n_depth": 0, "repack": True}}
tests = [dict(base, n_prompt=p, n_gen=0, avg_ts=figures[t][0], samples_ts=[figures[t][0]] * 3),
         dict(base, n_prompt=0, n_gen=n, avg_ts=figures[t][1], samples_ts=[figures[t][1]] * 3)]
print("[\\n" + ",\\n".join(json.dumps(x, indent=4) for x in tests) + "\\n]")
"""


def _exe(tmp_path, text, name="llama-bench"):
    path = tmp_path / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_one_row_per_thread_count_with_prefill_and_decode(tmp_path):
    exe = _exe(tmp_path, FAKE.format(python=sys.executable, figures=repr(FIGURES)))
    rows = run_llama_bench(exe, str(tmp_path / "m.gguf"), (1, 2), new_tokens=48, prompt_tokens=512)
    assert rows == [{"threads": 1, "prefill_tok_s": 49.6, "decode_tok_s": 17.6},
                    {"threads": 2, "prefill_tok_s": 91.25, "decode_tok_s": 30.5}]


def test_missing_binary_is_an_accel_error_naming_the_option(tmp_path):
    with pytest.raises(AccelError, match="--llama-bench"):
        run_llama_bench(str(tmp_path / "no-such-llama-bench"), str(tmp_path / "m.gguf"), (1,), 8, 8)


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_crashing_binary_is_an_accel_error_with_its_signal(tmp_path):
    # What an AMX build of llama.cpp 0c1e570 does on this machine: SIGSEGV at the first matmul.
    exe = _exe(tmp_path, f"#!{sys.executable}\nimport os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    with pytest.raises(AccelError, match=r"--llama-bench.*(SIGSEGV|signal 11)"):
        run_llama_bench(exe, str(tmp_path / "m.gguf"), (1,), 8, 8)


def test_timeout_is_an_accel_error(tmp_path, monkeypatch):
    # 2-thread llama-bench on a loaded 2-core VM (OpenMP spin-waits) can run for many minutes.
    import eval.bench_decode as bd

    monkeypatch.setattr(bd, "LLAMA_BENCH_TIMEOUT_S", 0.5)
    exe = _exe(tmp_path, f"#!{sys.executable}\nimport time\ntime.sleep(30)\n")
    with pytest.raises(AccelError, match=r"--llama-bench.*timed out"):
        bd.run_llama_bench(exe, str(tmp_path / "m.gguf"), (1,), 8, 8)
