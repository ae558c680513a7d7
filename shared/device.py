"""What a device does, independent of how messages travel: prune once, train on tasks, adopt
merged masks, persist state. The simulator and the worker process both run this class."""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from shared import codec
from shared.agreement import bernoulli_sample, blend_scores, dequantize, unpack_levels
from shared.bits import pack, popcount, positions, scatter, select, unpack
from shared.delta_codec import Coded, code_mask, decode_change, layer_segments
from shared.errors import CodecError, LayoutMismatch
from shared.models import MaskedNet, ModelSpec, build_model
from shared.pruning import one_shot_prune
from shared.train import TrainConfig, TrainStats, evaluate, local_train


@dataclass(frozen=True)
class FedMaskConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    local_epochs: int = 5
    prune_last_k: int = 2
    prune_rho: float = 0.2            # 1.0: no pruning (every element stays in the structure)
    upload: str = "threshold"         # threshold: the hard mask | sample: one Bernoulli draw of sigmoid(S)
    share: float = 1.0                # agreement downlink: how far scores move to the fleet's logit
    clip: float = 0.02                # agreement downlink: theta clipped to [clip, 1 - clip]
    # Agreement downlink, share chosen by the device: when not empty (and the device holds a validation
    # split), each agreement is blended at every share in this grid and the one with the lowest loss on
    # the device's own validation data is kept. How much a device gains from the fleet depends on how
    # much its data overlap the others' (docs/results.md: +7.8 points on Dirichlet, -1.7 on label
    # shards for one fixed share), which only the device can see.
    share_grid: tuple[float, ...] = ()
    coding: str = "raw"               # raw: updates carry the structure's bits | delta: their change
                                      # against the merged mask both sides hold, when that is smaller
                                      # (shared/delta_codec.py); merged masks then come delta-coded too

    @property
    def takes_agreement(self) -> bool:
        """Whether this device expects the agreement downlink (enc "q4") rather than merged bits: for
        sampled uploads (FedPM's estimate), or when it chooses its own share of the agreement."""
        return self.upload == "sample" or bool(self.share_grid)


def derive_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from ints and strings (device ids), identical on every platform."""
    words = [p if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(2, np.uint64)[0] >> np.uint64(1))


class DeviceRuntime:
    def __init__(self, device_id: str, spec: ModelSpec, cfg: FedMaskConfig,
                 train_xy: tuple[np.ndarray, np.ndarray], seed: int,
                 val_xy: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.device_id = device_id
        self.spec = spec
        self.cfg = cfg
        self.x, self.y = train_xy
        # The device's own validation split: when given (and not empty), every update reports the trained
        # mask's accuracy on it, so an operator sees whether learning works without touching test data.
        # The simulator leaves it out (it scores validation itself; its updates stay byte-identical).
        self.val_xy = val_xy if val_xy is not None and len(val_xy[1]) > 0 else None
        self.seed = seed
        self.model: MaskedNet = build_model(spec)
        self.fingerprint = self.model.fingerprint()
        self.layout = self.model.layout_hash()
        self.nbits = self.model.nbits
        self.structure: np.ndarray | None = None  # packed S_i, set by pruning
        self.mask_version = 0
        self.last_stats: TrainStats | None = None
        if cfg.coding not in ("raw", "delta"):
            raise ValueError(f"unknown coding {cfg.coding!r}; choose raw or delta")
        # Delta coding's bases: the initial mask (version 0, derived from the model seed alone), the
        # merged mask last applied (packed, inside S_i) and the update last sent (its round, its bits).
        self._initial = pack(self.model.mask_bits())
        self.held: np.ndarray | None = None
        self.sent: tuple[int, bytes] | None = None
        self._segments: list[int] | None = None
        self._coded_against: int | None = None  # the base version of the last delta-coded update
        self.chosen_shares: list[float] = []    # with share_grid: the share chosen at each agreement
        if any(not 0.0 <= s <= 1.0 for s in cfg.share_grid):
            raise ValueError(f"share_grid values must lie in [0, 1], got {cfg.share_grid}")

    # -- protocol ----------------------------------------------------------------------
    def hello(self, round_id: int = 0) -> codec.Message:
        """Prune once (if not done yet) and announce the structure."""
        if self.structure is None:
            bits, self.last_stats = one_shot_prune(
                self.model, self.x, self.y, self.cfg.train, last_k=self.cfg.prune_last_k,
                rho=self.cfg.prune_rho, seed=derive_seed(self.seed, "prune", self.device_id))
            self.structure = pack(bits)
        return codec.make_hello(device=self.device_id, round=round_id, model=self.fingerprint,
                                layout=self.layout, structure=self.structure.tobytes(), nbits=self.nbits)

    def handle_task(self, task: codec.Message) -> codec.Message:
        """Train E local epochs from the current mask and return the update (bits inside S_i)."""
        self._check_peer(task)
        if self.structure is None:
            raise RuntimeError("a task arrived before the device pruned; call hello() first")
        # The update names the mask version it trained from (self.mask_version), so the aggregator
        # always knows when a device trained on a mask older than the one it last sent.
        self.last_stats = local_train(self.model, self.x, self.y, self.cfg.local_epochs, self.cfg.train,
                                      seed=derive_seed(self.seed, "round", task.round, self.device_id))
        inside = select(pack(self._upload_bits(task.round)), self.structure, self.nbits).tobytes()
        coded, delta = self._code_update(task, inside), self._delta_coding()
        self.sent = (task.round, inside)
        st = self.last_stats
        # Scored with the hard mask in eval mode: no random draw, so training and uploads are unchanged.
        val_accuracy = None if self.val_xy is None else self.evaluate(*self.val_xy)[1]
        return codec.make_update(
            device=self.device_id, round=task.round, model=self.fingerprint, layout=self.layout,
            bits=coded.bits, nbits=popcount(self.structure), version=self.mask_version, enc=coded.enc,
            base=coded.base, mask_crc32=coded.mask_crc32, downlink="delta" if delta else None,
            stats=codec.Stats(samples=st.samples, loss=_finite(st.loss), accuracy=st.accuracy,
                              val_accuracy=val_accuracy, train_seconds=st.seconds))

    def _delta_coding(self) -> bool:
        """Delta coding needs a bit mask on both sides: not with the agreement downlink."""
        return self.cfg.coding == "delta" and not self.cfg.takes_agreement

    def _code_update(self, task: codec.Message, inside: bytes) -> Coded:
        """Against the merged mask the device holds, but only when the task says the aggregator holds
        the same version: a device that missed a mask (or whose state predates it) sends raw bits."""
        n = popcount(self.structure) if self.structure is not None else 0
        # Never two deltas against one base: a merged mask always follows an update that was merged,
        # so a second update against the same version means the first was not (late, or refused, e.g.
        # bad_base if the aggregator's mask of that version is not this one). Raw bits resynchronise.
        if not self._delta_coding() or task.version != self.mask_version or self._coded_against == self.mask_version:
            self._coded_against = None
            return Coded("structure", inside)
        coded = code_mask(inside, n, self._held_bits(), self.mask_version, self._layer_segments())
        self._coded_against = self.mask_version if coded.enc == "delta" else None
        return coded

    def _held_bits(self) -> bytes | None:
        assert self.structure is not None
        if self.held is not None:
            return self.held.tobytes()
        if self.mask_version == 0:
            return select(self._initial, self.structure, self.nbits).tobytes()
        return None  # a state saved before delta coding: the mask it holds is not on disk

    def _layer_segments(self) -> list[int]:
        if self._segments is None:
            assert self.structure is not None
            sizes = [int(np.prod(shape)) for _, shape in self.model.layout()]
            self._segments = layer_segments(positions(self.structure, self.nbits), sizes)
        return self._segments

    def handle_mask(self, msg: codec.Message) -> None:
        """Adopt a merged mask: scores keep their magnitude and take the received sign; or, for an
        agreement downlink (enc "q4"), blend the fleet's agreement into the scores."""
        self._check_peer(msg)
        if self.structure is None or msg.bits is None or msg.version is None:
            raise RuntimeError("mask message before pruning, or without bits/version")
        if msg.version <= self.mask_version:
            return  # a redelivered or re-published mask: already applied
        if msg.enc == "q4":
            self._apply_agreement(msg.bits, msg.version)
            return
        bits = self._undelta(msg) if msg.enc == "delta" else msg.bits
        inside = np.frombuffer(bits, dtype=np.uint8)
        full = unpack(scatter(inside, self.structure, self.nbits), self.nbits)
        self.model.apply_mask_bits(full)
        self.held = inside.copy()
        self.mask_version = msg.version

    def _undelta(self, msg: codec.Message) -> bytes:
        """A merged mask coded against the update this device sent for round `msg.base` (a round's close:
        base = the mask's own version), or against the merged mask of version `msg.base` it holds (an async
        flush: base older than the mask). Unknown base: stale_base, and the mask is not applied; the next
        update then goes raw (the task's version differs from the device's), so its merged mask is coded
        against a base the device holds."""
        assert msg.bits is not None and msg.nbits is not None and msg.mask_crc32 is not None
        assert self.structure is not None and msg.version is not None and msg.base is not None
        if msg.nbits != popcount(self.structure):
            raise CodecError("bad_length", f"mask of {msg.nbits} bits for a structure of {popcount(self.structure)}")
        if msg.base < msg.version:
            held = self._held_bits() if msg.base == self.mask_version else None
            if held is None:
                raise CodecError("stale_base", f"mask v{msg.version} is coded against mask v{msg.base}; "
                                 f"this device holds v{self.mask_version}")
            return decode_change(msg.bits, held, msg.nbits, msg.mask_crc32)
        if self.sent is None or self.sent[0] != msg.base:
            raise CodecError("stale_base", f"mask v{msg.version} is coded against round {msg.base}'s update; "
                             f"this device holds {'none' if self.sent is None else self.sent[0]}'s")
        return decode_change(msg.bits, self.sent[1], msg.nbits, msg.mask_crc32)

    def _upload_bits(self, round_id: int) -> np.ndarray:
        if self.cfg.upload == "threshold":
            return self.model.mask_bits()
        if self.cfg.upload == "sample":  # unbiased 1-bit estimate of sigmoid(S) per element
            probs = 1.0 / (1.0 + np.exp(-self.model.scores_flat().astype(np.float64)))
            drawn = bernoulli_sample(probs, derive_seed(self.seed, "upload", round_id, self.device_id))
            inside: np.ndarray = drawn & self.model.structure_bits().astype(bool)
            return inside
        raise ValueError(f"unknown upload {self.cfg.upload!r}; choose threshold or sample")

    def _apply_agreement(self, data: bytes, version: int) -> None:
        assert self.structure is not None
        where = positions(self.structure, self.nbits)
        theta = dequantize(unpack_levels(data, len(where)))
        scores = self.model.scores_flat()
        share = self._choose_share(scores, where, theta) if self.cfg.share_grid else self.cfg.share
        scores[where] = blend_scores(scores[where], theta, share=share, clip=self.cfg.clip)
        self.model.set_scores(scores)
        self.mask_version = version

    def _choose_share(self, scores: np.ndarray, where: np.ndarray, theta: np.ndarray) -> float:
        """The share in cfg.share_grid whose blend has the lowest loss on this device's validation split
        (loss, not accuracy: a device holds a few validation samples, and accuracy ties on most shares).
        Ties go to the share nearest cfg.share, the task's tuned default. No validation data: cfg.share."""
        if self.val_xy is None:
            return self.cfg.share
        best: tuple[float, float, float] | None = None
        for share in self.cfg.share_grid:
            trial = scores.copy()
            trial[where] = blend_scores(scores[where], theta, share=share, clip=self.cfg.clip)
            self.model.set_scores(trial)
            loss = self.evaluate(*self.val_xy)[0]
            key = (loss if np.isfinite(loss) else float("inf"), abs(share - self.cfg.share), share)
            best = key if best is None or key < best else best
        assert best is not None
        self.chosen_shares.append(best[2])
        return best[2]

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        return evaluate(self.model, x, y)

    # -- persistence (the worker keeps this on disk; no pickle) ------------------------
    def save(self, path: Path) -> None:
        arrays = {f"param/{k}": v.detach().numpy() for k, v in self.model.state_dict().items()}
        meta = np.array([self.mask_version], dtype=np.int64)
        assert self.structure is not None
        spec = json.dumps(asdict(self.spec)).encode()
        tmp = path.with_name(path.name + ".tmp.npz")
        if self.held is not None:  # delta coding's bases (absent: the next update goes raw)
            arrays["held"] = self.held
        if self.sent is not None:
            arrays |= {"sent": np.frombuffer(self.sent[1], np.uint8), "sent_round": np.array([self.sent[0]], np.int64)}
        np.savez(tmp, structure=self.structure, meta=meta, spec=np.frombuffer(spec, dtype=np.uint8),
                 fingerprint=np.frombuffer(self.fingerprint.encode(), dtype=np.uint8), **arrays)
        tmp.replace(path)  # atomic: a crash mid-write never leaves a half-written state

    def load(self, path: Path) -> None:
        with np.load(path, allow_pickle=False) as z:
            if bytes(z["fingerprint"]).decode() != self.fingerprint:
                raise LayoutMismatch(f"{path} was saved for other frozen weights")
            state = {k.removeprefix("param/"): torch.from_numpy(z[k]) for k in z.files if k.startswith("param/")}
            self.model.load_state_dict(state)
            self.structure = z["structure"].copy()
            self.mask_version = int(z["meta"][0])
            self.held = z["held"].copy() if "held" in z.files else None  # absent in states saved before
            self.sent = (int(z["sent_round"][0]), z["sent"].tobytes()) if "sent" in z.files else None
            self._segments = None

    @staticmethod
    def read_spec(path: Path) -> ModelSpec:
        with np.load(path, allow_pickle=False) as z:
            raw = json.loads(bytes(z["spec"]).decode())
        raw["input_shape"] = tuple(raw["input_shape"])
        return ModelSpec(**raw)

    def _check_peer(self, msg: codec.Message) -> None:
        if msg.model != self.fingerprint or msg.layout != self.layout:
            raise LayoutMismatch(f"message for model {msg.model}/{msg.layout}, device has "
                                 f"{self.fingerprint}/{self.layout}")


def _finite(v: float) -> float:
    return v if np.isfinite(v) else 0.0
