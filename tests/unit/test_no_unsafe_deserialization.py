"""No code path may deserialise with pickle: a pickle (or torch.load, joblib.load, np.load with
allow_pickle=True...) of a file or message runs arbitrary code. Models and state go through .npz
read with allow_pickle=False (shared/device.py, shared/export.py, shared/data/cache.py) and messages
through msgpack (shared/codec.py).

Every .py file under shared/, aggregator/, worker/ and ops/ is scanned: code tokens only, so a
docstring or comment that mentions pickle is fine. np.load / numpy.load calls are checked through the
AST: allow_pickle must be absent (numpy's default, False since 1.16.3) or the literal False. The
matchers are checked against synthetic offending and harmless lines first, so the test can fail.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("shared", "aggregator", "worker", "ops")

# Applied to each line with strings and comments blanked out.
UNSAFE: dict[str, re.Pattern[str]] = {
    "pickle import": re.compile(r"\b(import|from)\s+(c?[Pp]ickle|_pickle|dill|cloudpickle|shelve|marshal)\b"),
    "pickle-style load": re.compile(r"\b(c?[Pp]ickle|_pickle|dill|cloudpickle|marshal)\s*\.\s*(loads?|Unpickler)\b"),
    "Unpickler": re.compile(r"\bUnpickler\b"),
    "joblib.load": re.compile(r"\bjoblib\s*\.\s*load\b|\bfrom\s+joblib\s+import\b[^#\n]*\bload\b"),
    "torch.load": re.compile(r"\btorch\s*\.\s*load\b|\bfrom\s+torch\s+import\b[^#\n]*\bload\b"),
    "pandas read_pickle": re.compile(r"\bread_pickle\b"),
    "shelve.open": re.compile(r"\bshelve\s*\.\s*open\b"),
    "allow_pickle=True": re.compile(r"\ballow_pickle\s*=\s*(?!False\b)"),
}
_STRINGISH = {tokenize.STRING, tokenize.COMMENT} | {getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}


def code_lines(source: str) -> list[str]:
    """The source's lines with every string literal and comment replaced by spaces."""
    lines = source.splitlines()
    chars = [list(line) for line in lines]
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in _STRINGISH:
            continue
        (r0, c0), (r1, c1) = tok.start, tok.end
        for r in range(r0, r1 + 1):
            row = chars[r - 1]
            start = c0 if r == r0 else 0
            end = c1 if r == r1 else len(row)
            row[start:end] = [" "] * (end - start)
    return ["".join(row) for row in chars]


def _np_names(tree: ast.AST) -> set[str]:
    """Local names bound to numpy (import numpy as np)."""
    names = {"np", "numpy"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name for a in node.names if a.name == "numpy"}
    return names


def unsafe_np_load(tree: ast.AST) -> list[tuple[int, str]]:
    """np.load / numpy.load / `from numpy import load` calls whose allow_pickle is not absent or False."""
    np_names = _np_names(tree)
    bare = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "numpy"
            for a in n.names if a.name == "load"}
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        is_load = (isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name)
                   and f.value.id in np_names) or (isinstance(f, ast.Name) and f.id in bare)
        if not is_load:
            continue
        if any(kw.arg is None for kw in node.keywords):
            out.append((node.lineno, "np.load(**kwargs): allow_pickle cannot be checked"))
        values = [kw.value for kw in node.keywords if kw.arg == "allow_pickle"]
        if len(node.args) >= 3:  # np.load(file, mmap_mode, allow_pickle, ...)
            values.append(node.args[2])
        for v in values:
            if not (isinstance(v, ast.Constant) and v.value is False):
                out.append((node.lineno, f"np.load with allow_pickle={ast.unparse(v)}"))
    return out


def scan_source(source: str, name: str = "<source>") -> list[str]:
    """'name:line: what' for every unsafe deserialisation in the source."""
    found = []
    for i, line in enumerate(code_lines(source), start=1):
        for what, pattern in UNSAFE.items():
            if pattern.search(line):
                found.append(f"{name}:{i}: {what}: {source.splitlines()[i - 1].strip()}")
    found += [f"{name}:{line}: {what}" for line, what in unsafe_np_load(ast.parse(source))]
    return found


def scanned_files() -> list[Path]:
    files = [p for d in SCANNED for p in (ROOT / d).rglob("*.py")
             if not {".venv", "__pycache__", "tests"} & set(p.relative_to(ROOT).parts)]
    return sorted(files)


# ----------------------------------------------------------------------------------- the matcher itself


@pytest.mark.parametrize("line", [
    "import pickle",
    "import cPickle as p",
    "from pickle import loads",
    "import dill",
    "x = pickle.loads(body)",
    "obj = pickle.load(open(path, 'rb'))",
    "u = pickle.Unpickler(f)",
    "m = joblib.load(path)",
    "from joblib import dump, load",
    "state = torch.load(path)",
    "state = torch.load(path, weights_only=True)",
    "from torch import load",
    "df = pd.read_pickle(path)",
    "db = shelve.open(path)",
    "import marshal",
    "a = np.load(path, allow_pickle=True)",
    "a = np.load(path, allow_pickle=flag)",
    "a = numpy.load(path, None, True)",
    "a = np.load(path, **opts)",
])
def test_matcher_flags_an_offending_line(line: str) -> None:
    source = "import numpy as np\nimport numpy\n" + line + "\n"
    found = scan_source(source, "synthetic.py")
    assert found, f"not flagged: {line}"
    assert all(f.startswith("synthetic.py:3:") for f in found), found


@pytest.mark.parametrize("line", [
    '"""Never pickle: pickle.loads on a message runs code; torch.load too."""',
    "# pickle.load(f) would be unsafe here",
    "msg = 'allow_pickle=True is refused'",
    "with np.load(path, allow_pickle=False) as z: pass",
    "with np.load(path) as z: pass",
    "z = np.load(path, None, False)",
    "np.savez(fh, **arrays)",
    "picklable = True",
    "model.load_state_dict(state)",
])
def test_matcher_passes_a_harmless_line(line: str) -> None:
    assert scan_source("import numpy as np\n" + line + "\n") == []


def test_numpy_default_refuses_pickles(tmp_path: Path) -> None:
    """'rely on the default' is only safe while numpy's default is allow_pickle=False."""
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        np.load(path)


# ------------------------------------------------------------------------------------------- the code


def test_no_unsafe_deserialization_in_the_code() -> None:
    files = scanned_files()
    assert any(p.name == "device.py" for p in files) and len(files) > 20, "the scan found too few files"
    found = [f for p in files for f in scan_source(p.read_text("utf-8"), str(p.relative_to(ROOT)))]
    assert found == [], "unsafe deserialization:\n" + "\n".join(found)


def test_device_state_is_loaded_without_pickle() -> None:
    """shared/device.py keeps a worker's state on disk: its np.load calls pass allow_pickle=False."""
    tree = ast.parse((ROOT / "shared" / "device.py").read_text("utf-8"))
    loads = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == "load" and isinstance(n.func.value, ast.Name) and n.func.value.id == "np"]
    assert loads, "shared/device.py no longer calls np.load: update this test"
    for call in loads:
        kw = {k.arg: k.value for k in call.keywords}
        assert isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False, call.lineno
