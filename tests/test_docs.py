"""The documentation's commands name only what exists: in every fenced block of README.md, docs/*.md and
eval/README.md, each command that runs one of our scripts (train_*.py, eval/*.py, tools/*.py, bench/*.py or .sh,
behind python, bash or accelerate launch) gives it only flags its parser has; each `make` names a Makefile target;
each repository path named exists; and each relative link in README.md and docs/ points at a file and heading
that exist.

Which paths are checked: those under the repository's own folders (meta_lists/ launch/ tools/ eval/ bench/ modules/
docs/ tests/ data/demo/) and the top-level scripts and Makefile; never outputs (runs/...), ../shared/data or a
reader's own files. Not checked either: a name starting with `my_` (the pages' placeholder for the reader's own file,
e.g. meta_lists/my_tasks.txt), and a path that an earlier or the same line of the block writes (the value of
--output_dir / --output / --out / --output-dir / --work / --work_dir, the target of > or >>, mkdir's folders, cp's
destination) or anything under it. A script's flags are read from its `--help` (once per script per session)."""

import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

CHECKED_PATH = re.compile(
    r"(?<![\w./$~-])((?:meta_lists|launch|tools|eval|bench|modules|docs|tests|data/demo)/[\w.*/-]*[\w*]"
    r"|train_\w+\.py\b|Makefile\b)")
SCRIPT = re.compile(r"^(?:train_\w+\.py|(?:eval|tools|bench)/\w+\.(?:py|sh))$")
LAUNCHER = re.compile(r"^(?:python3?(?:\.\d+)?|accelerate|bash|sh|\$PYTHON|\$\{PYTHON\})$")
WRITES_NEXT = {"--output_dir", "--output", "--out", "--output-dir", "--work", "--work_dir", ">", ">>"}
SEPARATORS = {"&&", "||", ";", "|"}
HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def documents():
    return ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")), "eval/README.md"]


def fenced_blocks(text):
    """(line number of the block's first line, its lines) for every ``` block."""
    blocks, start, body = [], None, []
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            if start is None:
                start, body = number + 1, []
            else:
                blocks.append((start, body))
                start = None
        elif start is not None:
            body.append(line)
    return blocks


def commands(start, lines):
    """(line number, command) with `\\` continuations joined and here-document bodies left out."""
    joined, heredoc_end, pending, first = [], None, "", None
    for number, line in enumerate(lines, start):
        if heredoc_end is not None:
            heredoc_end = None if line.strip() == heredoc_end else heredoc_end
            continue
        first = number if not pending else first
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        command, pending = pending + line, ""
        joined.append((first, command))
        marker = HEREDOC.search(command)
        heredoc_end = marker.group(1) if marker else None
    return joined


def words(command):
    """The command's words (shell quoting and comments as bash reads them), cut into simple commands."""
    try:
        tokens = shlex.split(command, comments=True)
    except ValueError:  # not shell (a tree or a data line): its words as written
        tokens = command.split()
    simple = [[]]
    for token in tokens:
        if token in SEPARATORS:
            simple.append([])
        else:
            simple[-1].append(token)
    return [tokens for tokens in simple if tokens]


def written_paths(tokens):
    """What a simple command writes: the values of output flags, redirection targets, mkdir's and cp's targets."""
    written = [tokens[i + 1] for i, token in enumerate(tokens[:-1]) if token.split("=")[0] in WRITES_NEXT]
    written += [token.split("=", 1)[1] for token in tokens if "=" in token and token.split("=")[0] in WRITES_NEXT]
    if tokens[0] == "mkdir":
        written += [token for token in tokens[1:] if not token.startswith("-")]
    if tokens[0] == "cp" and len(tokens) > 2:
        written.append(tokens[-1])
    return [path.rstrip("/") for path in written]


@functools.lru_cache(maxsize=None)
def script_flags(script):
    """The option strings of a script's parser, from its --help."""
    command = ["bash", script, "--help"] if script.endswith(".sh") else [sys.executable, script, "--help"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO)))
    assert result.returncode == 0, f"{script} --help failed: {result.stderr[-2000:]}"
    flags = set()
    for line in result.stdout.splitlines():
        if re.match(r"^  -\S", line):  # an option line; its help text is indented further
            flags.update(re.findall(r"--[\w-]+", re.split(r"\s{2,}", line.strip())[0]))
    return frozenset(flags)


@functools.lru_cache(maxsize=None)
def make_targets():
    makefile = (REPO / "Makefile").read_text()
    return frozenset(target for line in makefile.splitlines()
                     for target in (re.match(r"^([\w.-]+(?:\s+[\w.-]+)*)\s*:(?!=)", line) or [None, ""])[1].split())


def path_exists(path):
    return any(REPO.glob(path)) if "*" in path else (REPO / path).exists()


def problems_in(text, name, flags_of=script_flags, targets=make_targets):
    """Every flag, make target and repository path in the text's fenced blocks that does not exist, as messages."""
    problems = []
    for start, lines in fenced_blocks(text):
        written = []
        for number, command in commands(start, lines):
            simple_commands = words(command)
            for tokens in simple_commands:
                written += written_paths(tokens)
                if tokens[0] == "make":
                    for target in (t for t in tokens[1:] if not t.startswith("-") and "=" not in t):
                        if target not in targets():
                            problems.append(f"{name}:{number}: make has no target {target!r}")
                scripts = [i for i, token in enumerate(tokens) if SCRIPT.match(token)
                           and any(LAUNCHER.match(os.path.basename(t)) for t in tokens[:i])]
                if scripts:
                    script = tokens[scripts[0]]
                    known = flags_of(script)
                    for token in tokens[scripts[0] + 1:]:
                        flag = token.split("=", 1)[0]
                        if re.match(r"^--[\w-]+$", flag) and flag not in known:
                            problems.append(f"{name}:{number}: {script} has no flag {flag}")
            for path in CHECKED_PATH.findall(command.split(" #")[0] if not command.lstrip().startswith("#") else ""):
                if any(part.startswith("my_") for part in path.split("/")):
                    continue
                if any(path == w or path.startswith(w + "/") for w in written):
                    continue
                if not path_exists(path):
                    problems.append(f"{name}:{number}: {path} does not exist")
    return problems


def slug(heading):
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def link_problems(text, name):
    """Relative links whose file or heading is missing."""
    problems, prose = [], re.sub(r"```.*?```", "", text, flags=re.S)
    for number, line in enumerate(prose.splitlines(), 1):
        for target in LINK.findall(line):
            if re.match(r"^[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (REPO / name).parent / file
            if file and not path.exists():
                problems.append(f"{name}: link to {target}: {file} does not exist")
            elif anchor and (not file or path.suffix == ".md"):
                page = path.read_text(encoding="utf-8") if file else text
                headings = re.findall(r"^#+\s+(.*)$", re.sub(r"```.*?```", "", page, flags=re.S), re.M)
                if anchor not in {slug(h) for h in headings}:
                    problems.append(f"{name}: link to {target}: no heading #{anchor} in {file or name}")
    return problems


@pytest.mark.parametrize("name", documents())
def test_documented_commands_name_existing_flags_targets_and_paths(name):
    problems = problems_in((REPO / name).read_text(encoding="utf-8"), name)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", documents())
def test_links_between_pages_resolve(name):
    problems = link_problems((REPO / name).read_text(encoding="utf-8"), name)
    assert not problems, "\n".join(problems)


SYNTHETIC = """# A page

```bash
.venv/bin/python tools/export_checkpoint.py runs/x/checkpoint-1 runs/x/out --no_such_flag
accelerate launch -q --config_file launch/no_such.yaml train_finetune.py --model_name_or_path m \\
    --meta_list meta_lists/my_tasks.txt --made_up 3 --lr 1e-5
python tools/filter_pairs.py pairs.jsonl --output data/demo/new.jsonl && head data/demo/new.jsonl
cat meta_lists/nowhere.txt   # not here
make demo && make no-such-target SEED=1
```

text with [a link](nowhere.md) and [a heading](#no-such-heading)
"""


def test_the_checker_reports_a_made_up_flag_a_missing_path_and_target():
    problems = problems_in(SYNTHETIC, "synthetic.md")
    assert problems == [
        "synthetic.md:4: tools/export_checkpoint.py has no flag --no_such_flag",
        "synthetic.md:5: train_finetune.py has no flag --made_up",
        "synthetic.md:5: launch/no_such.yaml does not exist",
        "synthetic.md:8: meta_lists/nowhere.txt does not exist",
        "synthetic.md:9: make has no target 'no-such-target'",
    ], problems
    assert link_problems(SYNTHETIC, "docs/synthetic.md") == [
        "docs/synthetic.md: link to nowhere.md: nowhere.md does not exist",
        "docs/synthetic.md: link to #no-such-heading: no heading #no-such-heading in docs/synthetic.md"]


def test_the_layout_page_names_every_python_file_of_the_scripts_and_code_folders():
    """docs/layout.md lists each file once (`folder/name.py  what it holds`): a new module is described where a
    reader looks for it."""
    page = (REPO / "docs" / "layout.md").read_text(encoding="utf-8")
    named = set(re.findall(r"^([\w/]+\.(?:py|sh))\s", page, re.M))
    files = {str(path.relative_to(REPO)) for folder in ("modules", "eval", "tools", "bench")
             for pattern in ("*.py", "*.sh") for path in (REPO / folder).glob(pattern) if path.name != "__init__.py"}
    files |= {path.name for path in REPO.glob("train_*.py")}
    assert sorted(files - named) == [], "files docs/layout.md does not describe"
    assert sorted(named - files) == [], "files docs/layout.md names that do not exist"
