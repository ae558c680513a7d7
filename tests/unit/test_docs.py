"""The docs point at what exists: every repo path and relative link in the markdown files (and every
docs/ page a Python module cites) resolves, and the README's option lists are the CLI's own."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from ops.cli import main

ROOT = Path(__file__).resolve().parents[2]
# A mention counts as a repo path when it starts with one of these (the tracked top-level folders);
# runs/ and .data/ are outputs and caches, so they are not checked.
TOP = ("aggregator", "broker_config", "docs", "ops", "shared", "tests", "worker")
PY_DIRS = ("aggregator", "ops", "shared", "tests", "worker")
_TOP_ALT = "|".join(TOP)
PATH_RE = re.compile(rf"(?<![\w./~$-])((?:{_TOP_ALT})/[^\s`'\"(),;|]*)")
LINK_RE = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
PLACEHOLDER = re.compile(r"[<>{}\[\]*…]|\.\.\.")
# Inside a list item that starts with a backticked folder ("- `aggregator/`: `core.py` ..."), the
# item's bare names are that folder's files and subfolders.
ROOM_RE = re.compile(rf"`((?:{_TOP_ALT})/[\w/]*)`")
BARE_RE = re.compile(r"`([\w.@-]+(?:/|\.(?:py|md|lua|json|conf|yml|template|service)))`")


def _markdown_files() -> list[Path]:
    found = {ROOT / "README.md", *(p for d in TOP for p in (ROOT / d).rglob("*.md"))}
    return sorted(found)


def _mentions(text: str) -> list[str]:
    """Repo paths mentioned in `text`, without trailing punctuation; placeholders
    (shared/tuned/<task>/...) are left out because they name no single file."""
    out = []
    for raw in PATH_RE.findall(text):
        path = raw.rstrip(".:")
        if not PLACEHOLDER.search(path):
            out.append(path)
    return out


def _list_items(text: str) -> list[str]:
    """Markdown list items ("- ..." and their indented continuation lines), one string each."""
    items: list[str] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("- "):
            current = [line]
            items.append("")
        elif current is not None and line.startswith("  "):
            current.append(line)
        else:
            current = None
            continue
        items[-1] = " ".join(current)
    return items


def _room_names(text: str) -> list[str]:
    """The bare names in room items, as repo paths: "- `shared/sim/`: `tuning.py`" -> shared/sim/tuning.py."""
    out = []
    for item in _list_items(text):
        room = ROOM_RE.match(item[2:])
        if room and room.group(1).endswith("/"):
            out += [room.group(1) + name for name in BARE_RE.findall(item[room.end() + 2:])]
    return out


def _missing(path: str) -> str | None:
    """None when `path` (optionally `file.py::test_name`) exists in the repo; else why not."""
    file, _, test = path.partition("::")
    if not (ROOT / file).exists():
        return f"{file} does not exist"
    if test and not re.search(rf"^\s*def {re.escape(test)}\(", (ROOT / file).read_text(), re.MULTILINE):
        return f"{file} has no {test}"
    return None


@pytest.mark.parametrize("doc", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_repo_path_and_relative_link_in_the_docs_exists(doc: Path) -> None:
    text = doc.read_text()
    broken = [f"{p}: {why}" for p in (*_mentions(text), *_room_names(text)) if (why := _missing(p))]
    for target in LINK_RE.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        file = target.split("#", 1)[0]
        if not (doc.parent / file).exists():
            broken.append(f"link {target}: {file} does not exist next to {doc.name}")
    assert not broken, f"{doc.relative_to(ROOT)}:\n" + "\n".join(broken)


def test_docs_pages_cited_in_the_code_exist() -> None:
    cited = {
        (str(py.relative_to(ROOT)), page)
        for d in PY_DIRS
        for py in (ROOT / d).rglob("*.py")
        if py != Path(__file__).resolve()  # its own examples name missing pages on purpose
        for page in re.findall(r"\bdocs/[\w.-]+\.md\b", py.read_text())
    }
    assert cited, "expected some docs/ citations in the code"
    assert not [(py, page) for py, page in sorted(cited) if not (ROOT / page).is_file()]


def test_the_path_check_catches_a_missing_page() -> None:
    assert _mentions("see docs/nowhere.md, and `shared/codec.py::decode`.") == [
        "docs/nowhere.md", "shared/codec.py::decode"]
    assert _missing("docs/nowhere.md") == "docs/nowhere.md does not exist"
    assert _missing("tests/unit/test_docs.py::test_no_such_test") is not None
    assert _missing("tests/unit/test_docs.py::test_the_path_check_catches_a_missing_page") is None
    assert _mentions("`shared/tuned/<task>/<variant>.json` and runs/demo/report.json") == []
    room = "- `aggregator/`: `core.py` (logic), `lua/`\n  and `store.py`; `make up`\n- `x.py` is not in a room"
    assert _room_names(room) == ["aggregator/core.py", "aggregator/lua/", "aggregator/store.py"]


# -- the README's CLI block is the CLI ---------------------------------------------------------
def _readme_commands() -> list[list[str]]:
    """Every `fedmask ...` line in the README's bash blocks, continuation lines joined, comments cut."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip().startswith("fedmask ")]


def _command(words: list[str]) -> click.Command:
    """The click command a README line runs (`fedmask round start ...` -> round's `start`)."""
    cmd: click.Command = main
    for word in words[1:]:
        if not isinstance(cmd, click.Group) or word not in cmd.commands:
            break
        cmd = cmd.commands[word]
    assert cmd is not main, f"no fedmask command in {' '.join(words)}"
    return cmd


def _choices(cmd: click.Command, opt: str) -> list[str]:
    param = next(p for p in cmd.params if opt in p.opts)
    assert isinstance(param.type, click.Choice), f"{opt} is not a choice"
    return [str(c) for c in param.type.choices]


def test_readme_lists_every_choice_of_simulate() -> None:
    simulate = [w for w in _readme_commands() if w[1] == "simulate"]
    assert len(simulate) == 1, "the README shows `fedmask simulate` once, with its choices"
    line = " ".join(simulate[0])
    for opt in ("--task", "--method", "--merge"):
        assert re.search(rf"{opt} \{{", line), f"README's fedmask simulate line lists no {{...}} for {opt}"


def test_every_choice_list_in_the_readme_is_the_commands() -> None:
    """`--opt {a,b,c}` anywhere in the README's CLI block names exactly the command's choices."""
    checked = 0
    for words in _readme_commands():
        cmd = _command(words)
        for opt, listed in re.findall(r"(--[a-z-]+) \{([^}]*)\}", " ".join(w.lstrip("[") for w in words)):
            assert sorted(listed.split(",")) == sorted(_choices(cmd, opt)), f"{' '.join(words[:2])} {opt}"
            checked += 1
    assert checked >= 6


def test_every_option_in_the_readme_exists_on_its_command() -> None:
    lines = _readme_commands()
    assert {w[1] for w in lines} >= {"simulate", "experiment", "tune", "export", "bench", "round", "devices"}
    unknown = []
    for words in lines:
        cmd = _command(words)
        known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        unknown += [f"{' '.join(words[:3])}: {w}" for w in words
                    if (w.lstrip("[").startswith("--") and w.lstrip("[").split("=")[0].rstrip("]") not in known)]
    assert not unknown
