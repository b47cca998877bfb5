"""Every fenced code block in README.md and docs/**/*.md runs as written.

Fences: ```python (run in one interpreter per file, in order, so a file's blocks may build on
each other), ```bash (run with `bash -euo pipefail`, the virtual environment's bin first on PATH),
```text (output, never run). The only blocks not run are the README's two setup commands
(fence ```bash setup): `scripts/main.sh` takes minutes and `scripts/test.sh` is this suite. Each
file's blocks run in a fresh temporary directory. Links between the docs must resolve, anchors
included, and every section of docs/results.md names its command and commit.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUN_KINDS = ("python", "bash")
KINDS = (*RUN_KINDS, "text", "bash setup")
# The only commands the test does not run (they are the setup itself and this suite).
SETUP_COMMANDS = ["bash scripts/main.sh", "bash scripts/test.sh"]
BLOCK_TIMEOUT_S = 300
MARK = "@@accel-docs-test-block-done@@"


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    kind: str  # the fence's info string
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks_of(path: Path) -> list[Block]:
    """The fenced blocks of a markdown file. Fences must start at column 0 (an indented fence would
    be easy to miss here and renders differently); a fence left open is an error."""
    out, open_at, kind, body = [], None, "", []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.lstrip()
        if open_at is None:
            if stripped.startswith("```"):
                assert line == stripped, f"{path.relative_to(ROOT)}:{i}: indented code fence"
                open_at, kind, body = i, line[3:].strip(), []
        elif line.rstrip() == "```":
            out.append(Block(path, open_at, kind, "\n".join(body) + "\n"))
            open_at = None
        else:
            assert not stripped.startswith("```"), f"{path.relative_to(ROOT)}:{i}: fence inside a block"
            body.append(line)
    assert open_at is None, f"{path.relative_to(ROOT)}:{open_at}: code fence never closed"
    return out


def all_blocks() -> list[Block]:
    return [b for p in DOCS for b in blocks_of(p)]


def commands(code: str) -> list[str]:
    """A bash block's commands, comments and blank lines dropped."""
    return [c for c in (line.split("#", 1)[0].strip() for line in code.splitlines()) if c]


# ---------------------------------------------------------------------------------------------
# Fast checks: the shape of the docs.

def test_the_docs_exist_and_the_readme_is_short():
    names = {p.relative_to(ROOT).as_posix() for p in DOCS}
    for want in ("README.md", "docs/results.md", "docs/guarantees.md", "docs/methods/double_sparsity.md",
                 "docs/methods/ds_offload.md", "docs/methods/prune.md", "docs/methods/gqsa.md",
                 "docs/methods/rsparse.md"):
        assert want in names, f"{want} is missing"
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= 200, f"README.md has {n} lines (at most 200)"


def test_every_fence_names_a_known_kind():
    bad = [f"{b.where}: ```{b.kind}" for b in all_blocks() if b.kind not in KINDS]
    assert not bad, f"code fences must be one of {KINDS} (output goes in ```text): {bad}"


def test_only_the_two_setup_commands_are_skipped():
    skipped = [b for b in all_blocks() if b.kind == "bash setup"]
    assert [b.path.name for b in skipped] == ["README.md"], [b.where for b in skipped]
    assert commands(skipped[0].code) == SETUP_COMMANDS


def test_the_readme_starts_with_the_two_commands():
    first = all_blocks()[0]
    assert first.path.name == "README.md" and first.kind == "bash setup", first.where


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    out, seen, in_code = set(), {}, False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"^#{1,6} (.*)$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_links_between_the_docs_resolve():
    bad = []
    for p in DOCS:
        text = re.sub(r"^```.*?^```", "", p.read_text(encoding="utf-8"), flags=re.M | re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
                continue
            file_part, _, anchor = target.partition("#")
            dest = (p.parent / file_part).resolve() if file_part else p
            if not dest.exists():
                bad.append(f"{p.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.is_file() and anchor not in anchors(dest):
                bad.append(f"{p.relative_to(ROOT)}: {target} (no heading #{anchor} in {dest.name})")
    assert not bad, "\n".join(bad)


def test_every_results_section_names_its_command_and_commit():
    """docs/results.md: each section with a number says the command that produced it and the commit."""
    text = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    sections = re.split(r"^#{2,3} ", text, flags=re.M)[1:]
    assert len(sections) >= 10
    for sec in sections:
        title = sec.splitlines()[0]
        if not re.search(r"\d", sec.split("\n", 1)[1]):
            continue
        assert "`accel " in sec or "`bash " in sec or "`python " in sec, f"results.md '{title}': no command"
        assert re.search(r"`[0-9a-f]{7}`", sec), f"results.md '{title}': no commit"


def test_results_commits_exist():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    text = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    missing = []
    for h in sorted(set(re.findall(r"`([0-9a-f]{7})`", text))):
        r = subprocess.run(["git", "cat-file", "-e", f"{h}^{{commit}}"], cwd=ROOT, capture_output=True)
        if r.returncode:
            missing.append(h)
    if missing and subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT,
                                  capture_output=True, text=True).stdout.strip() == "true":
        pytest.skip("shallow clone: old commits are not here")
    assert not missing, f"docs/results.md cites commits that are not in this repository: {missing}"


# ---------------------------------------------------------------------------------------------
# The blocks themselves.

DRIVER = r"""
import json, sys, traceback
MARK = sys.argv[1]
ns = {"__name__": "__main__"}
for line in sys.stdin:
    req = json.loads(line)
    try:
        exec(compile(req["code"], req["where"], "exec"), ns)
        status = "ok"
    except BaseException:
        traceback.print_exc(file=sys.stdout)
        status = "error"
    sys.stdout.flush()
    sys.stderr.flush()
    print("\n" + MARK + status, flush=True)
"""


def docs_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    return env


class PythonSession:
    """One interpreter for a file's python blocks: each block is exec'd in the same namespace."""

    def __init__(self, cwd: Path, env: dict) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", DRIVER, MARK], cwd=cwd, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def run(self, block: Block) -> tuple[bool, str]:
        timer = threading.Timer(BLOCK_TIMEOUT_S, self.proc.kill)
        timer.start()
        try:
            self.proc.stdin.write(json.dumps({"code": block.code, "where": block.where}) + "\n")
            self.proc.stdin.flush()
            lines = []
            for line in self.proc.stdout:
                if line.startswith(MARK):
                    return line.strip() == MARK + "ok", "".join(lines)
                lines.append(line)
            return False, "".join(lines) + f"\n(interpreter exited, or killed after {BLOCK_TIMEOUT_S} s)"
        finally:
            timer.cancel()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def run_bash(block: Block, cwd: Path, env: dict) -> tuple[bool, str]:
    try:
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=cwd, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        return False, f"{e.output or ''}\n(killed after {BLOCK_TIMEOUT_S} s)"
    return r.returncode == 0, r.stdout


RUNNABLE = [p for p in DOCS if any(b.kind in RUN_KINDS for b in blocks_of(p))]


@pytest.mark.slow
@pytest.mark.parametrize("path", RUNNABLE, ids=[p.relative_to(ROOT).as_posix() for p in RUNNABLE])
def test_code_blocks_run_as_written(path, tmp_path):
    blocks = [b for b in blocks_of(path) if b.kind in RUN_KINDS]
    env = docs_env()
    session = None
    ran = []
    try:
        for b in blocks:
            t0 = time.perf_counter()
            if b.kind == "python":
                session = session or PythonSession(tmp_path, env)
                ok, out = session.run(b)
            else:
                ok, out = run_bash(b, tmp_path, env)
            assert ok, f"{b.where}: the ```{b.kind} block failed:\n{b.code}\n--- output (tail) ---\n{out[-4000:]}"
            ran.append(b)
            print(f"{b.where}: {b.kind} ok in {time.perf_counter() - t0:.1f}s")
    finally:
        if session is not None:
            session.close()
    # Every python/bash block of the file ran (none silently dropped).
    assert [b.line for b in ran] == [b.line for b in blocks]
    assert len(ran) == sum(b.kind in RUN_KINDS for b in blocks_of(path))


def test_every_runnable_block_belongs_to_a_run_file():
    """The parametrization above covers every python/bash block there is."""
    in_run = sum(1 for p in RUNNABLE for b in blocks_of(p) if b.kind in RUN_KINDS)
    total = sum(1 for b in all_blocks() if b.kind in RUN_KINDS)
    assert in_run == total and total >= 10, (in_run, total)
