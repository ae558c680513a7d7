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
from shared.errors import LayoutMismatch
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
        inside = select(pack(self._upload_bits(task.round)), self.structure, self.nbits)
        st = self.last_stats
        # Scored with the hard mask in eval mode: no random draw, so training and uploads are unchanged.
        val_accuracy = None if self.val_xy is None else self.evaluate(*self.val_xy)[1]
        return codec.make_update(
            device=self.device_id, round=task.round, model=self.fingerprint, layout=self.layout,
            bits=inside.tobytes(), nbits=popcount(self.structure), version=self.mask_version,
            stats=codec.Stats(samples=st.samples, loss=_finite(st.loss), accuracy=st.accuracy,
                              val_accuracy=val_accuracy, train_seconds=st.seconds))

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
        inside = np.frombuffer(msg.bits, dtype=np.uint8)
        full = unpack(scatter(inside, self.structure, self.nbits), self.nbits)
        self.model.apply_mask_bits(full)
        self.mask_version = msg.version

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
        scores[where] = blend_scores(scores[where], theta, share=self.cfg.share, clip=self.cfg.clip)
        self.model.set_scores(scores)
        self.mask_version = version

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        return evaluate(self.model, x, y)

    # -- persistence (the worker keeps this on disk; no pickle) ------------------------
    def save(self, path: Path) -> None:
        arrays = {f"param/{k}": v.detach().numpy() for k, v in self.model.state_dict().items()}
        meta = np.array([self.mask_version], dtype=np.int64)
        assert self.structure is not None
        spec = json.dumps(asdict(self.spec)).encode()
        tmp = path.with_name(path.name + ".tmp.npz")
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
