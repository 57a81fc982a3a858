"""The docs' links and commands point at things that exist.

    python -m pytest -q test_docs.py

CPU only, no network, nothing outside the repository. For README.md, RESULTS.md and docs/*.md:
- every relative link, `[text](path)`, `[text](path#anchor)`, `[text](#anchor)` and images `![alt](path)`, names a
  file or folder of the repository, and its anchor matches a heading of the target file under GitHub's slug rule;
- every command line in a fenced code block that runs a repository file (`python X.py`, `python3 X`, `./run.sh`,
  `bash X`, `torchrun ... X.py`) names a file that exists.
http(s) and mailto links are not checked.
"""
import glob
import os
import re
import shlex
import urllib.parse

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = ["README.md", "RESULTS.md"] + sorted(os.path.relpath(p, HERE)
                                            for p in glob.glob(os.path.join(HERE, "docs", "*.md")))
FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def split_fenced(text: str):
    """(prose lines, fenced code blocks): prose with each fenced block blanked, and the blocks' lines."""
    prose, blocks, block = [], [], None
    for line in text.split("\n"):
        if FENCE.match(line):
            if block is None:
                block = []
            else:
                blocks.append(block)
                block = None
            prose.append("")
        elif block is not None:
            block.append(line)
            prose.append("")
        else:
            prose.append(line)
    return prose, blocks


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text lowercased, punctuation dropped (letters, digits, `_`, `-` and spaces
    stay), spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: str) -> set:
    """The anchors of a markdown file's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    with open(path, encoding="utf-8") as f:
        prose, _ = split_fenced(f.read())
    seen, out = {}, set()
    for line in prose:
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        if slug in seen:
            seen[slug] += 1
            slug = f"{slug}-{seen[slug]}"
        else:
            seen[slug] = 0
        out.add(slug)
    return out


def links(text: str) -> list:
    """(line number, target) of every link outside code blocks and code spans."""
    prose, _ = split_fenced(text)
    out = []
    for n, line in enumerate(prose, 1):
        line = re.sub(r"(`+)(.+?)\1", "code", line)
        out += [(n, m.group(1)) for m in LINK.finditer(line)]
    return out


def link_problems(doc: str, root: str = HERE) -> list:
    """Each relative link of `doc` (a path under root) whose file or anchor does not exist, as 'doc:line: why'."""
    with open(os.path.join(root, doc), encoding="utf-8") as f:
        text = f.read()
    problems = []
    for n, target in links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        path = urllib.parse.unquote(path)
        full = os.path.normpath(os.path.join(root, os.path.dirname(doc), path)) if path else os.path.join(root, doc)
        where = f"{doc}:{n}: ({target})"
        if os.path.relpath(full, root).startswith(".."):
            problems.append(f"{where} points outside the repository")
        elif not os.path.exists(full):
            problems.append(f"{where}: no such file {os.path.relpath(full, root)}")
        elif anchor and not full.endswith(".md"):
            problems.append(f"{where}: an anchor into a file that is not markdown")
        elif anchor and anchor not in anchors(full):
            problems.append(f"{where}: no heading with anchor #{anchor} in {os.path.relpath(full, root)}")
    return problems


def command_files(line: str) -> list:
    """The repository files a shell line runs: the script of python/python3/bash/sh, the .py of torchrun, or a
    ./path command. Leading VAR=value assignments are skipped; `python -m module` names no file."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        words = line.split()
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words = words[1:]
    if not words:
        return []
    cmd, rest = words[0], words[1:]
    if cmd in ("python", "python3", "bash", "sh"):
        args = [w for w in rest if not w.startswith("-")]
        if "-m" in rest or "-c" in rest or not args:
            return []
        return [args[0]]
    if cmd == "torchrun":
        return [w for w in rest if w.endswith(".py")][:1]
    if cmd.startswith("./"):
        return [cmd]
    return []


def command_problems(doc: str, root: str = HERE) -> list:
    """Each fenced command line of `doc` that runs a file the repository lacks, as 'doc: why'."""
    with open(os.path.join(root, doc), encoding="utf-8") as f:
        _, blocks = split_fenced(f.read())
    problems = []
    for block in blocks:
        joined = "\n".join(block).replace("\\\n", " ")  # continuation lines are one command
        for line in joined.split("\n"):
            for name in command_files(line):
                if not os.path.isfile(os.path.join(root, name)):
                    problems.append(f"{doc}: `{line.strip()}` runs {name}, which is not in the repository")
    return problems


def test_docs_exist():
    assert os.path.isfile(os.path.join(HERE, "README.md"))
    assert len(DOCS) > 2, "no docs/*.md found"


@pytest.mark.parametrize("doc", DOCS)
def test_links_resolve(doc):
    problems = link_problems(doc)
    assert not problems, "broken links:\n" + "\n".join(problems)


@pytest.mark.parametrize("doc", [d for d in DOCS if d != "RESULTS.md"])
def test_commands_name_existing_files(doc):
    problems = command_problems(doc)
    assert not problems, "\n".join(problems)


def test_readme_runs_repository_files():
    """The README's fenced blocks do run repository files, so the test above is not vacuous for it."""
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        _, blocks = split_fenced(f.read())
    names = {n for b in blocks for line in b for n in command_files(line)}
    assert {"./run.sh", "train_gpt.py"} <= names, names


def test_github_slug():
    assert github_slug("Studies: `compare` and `ablate`") == "studies-compare-and-ablate"
    assert github_slug("Table 1, side by side (each arm at its own best learning rate)") == \
        "table-1-side-by-side-each-arm-at-its-own-best-learning-rate"
    assert github_slug("The mask, the gate and the backends") == "the-mask-the-gate-and-the-backends"
    assert github_slug("Figures: `plot.py`") == "figures-plotpy"
    assert github_slug("N nodes") == "n-nodes"
    assert github_slug("Tried, and not kept") == "tried-and-not-kept"
    assert github_slug("a_b [link](x.md)") == "a_b-link"


def test_checker_catches_breakage(tmp_path):
    """The checks fail on a missing file, a missing anchor, a duplicate heading's suffix and a missing script."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "run.sh").write_text("")
    (tmp_path / "docs" / "a.md").write_text("# Top\n\n## Part\n\n## Part\n\n```bash\n# not a heading\n```\n")
    (tmp_path / "README.md").write_text(
        "# Title\n\n"
        "[ok](docs/a.md) [ok](docs/a.md#part-1) [ok](#title) [web](https://example.com/x#y) `[code](nope.md)`\n"
        "[gone](docs/b.md) [bad anchor](docs/a.md#part-2) [comment](docs/a.md#not-a-heading) [self](#nope)\n\n"
        "```bash\n./run.sh gated\nNGPU=2 python train_gpt.py --x 1   # a comment\npython -m pytest -q\n"
        "torchrun --standalone \\\n    missing.py --y\n```\n")
    problems = link_problems("README.md", root=str(tmp_path))
    assert len(problems) == 4, problems
    assert all(p.startswith("README.md:4:") for p in problems), problems
    commands = command_problems("README.md", root=str(tmp_path))
    assert len(commands) == 2 and "train_gpt.py" in commands[0] and "missing.py" in commands[1], commands
    assert link_problems("docs/a.md", root=str(tmp_path)) == []
