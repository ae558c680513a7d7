"""Model builders over masked layers, and the flat bit-vector view used on the wire.

Every device builds the same network from a ModelSpec (same seed -> same frozen weights and
the same initial scores). The masked tensors, in construction order, define the layout: the
concatenation of their flattened elements is the bit vector that masks and structures use.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor, nn

from shared.frozen import fingerprint, frozen_weight, initial_scores, layout_hash
from shared.layers import (
    MaskedConv2d,
    MaskedEmbedding,
    MaskedLinear,
    MaskedLSTMLayer,
    MaskedTensor,
)

ARCHS = ("mlp", "cnn", "char_lstm")


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    input_shape: tuple[int, ...]
    num_classes: int
    width: int = 256
    seed: int = 0
    init: str = "signed_constant"
    score_spread: float = 0.01  # initial scores U(-a, a): half the mask on, all elements still undecided
    real_gate: str = "o"
    embed_dim: int = 8
    dense: bool = False  # True: train W directly (the FedAvg/Standalone baselines), no mask
    # True: the output layer has real-valued weights trained on the device and never sent: it is
    # not part of the masked layout (nbits, fingerprint, structures, wire bits exclude it).
    personal_head: bool = False

    def with_(self, **changes: object) -> ModelSpec:
        return replace(self, **changes)  # type: ignore[arg-type]


class MaskedNet(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        if spec.arch not in ARCHS:
            raise ValueError(f"unknown arch {spec.arch!r}; choose one of {ARCHS}")
        self.spec = spec
        self.tensors = nn.ModuleList()
        self._layer = 0
        build = {"mlp": self._build_mlp, "cnn": self._build_cnn, "char_lstm": self._build_lstm}[spec.arch]
        self.body = build()

    # -- construction -------------------------------------------------------------------
    def _tensor(self, name: str, shape: tuple[int, ...], fan_in: int, kind: str,
                layer_index: int | None = None, head: bool = False) -> MaskedTensor:
        s = self.spec
        personal = head and s.personal_head and not s.dense
        # A personal head starts like a dense baseline's layer (kaiming), not from +-c constants.
        w = frozen_weight(s.seed, name, shape, fan_in, "kaiming_uniform" if personal else s.init)
        sc = initial_scores(s.seed, name, shape, s.score_spread)
        idx = self._layer if layer_index is None else layer_index
        t = MaskedTensor(name, w, sc, idx, kind, dense=s.dense or personal)
        t.personal = personal
        if layer_index is None:
            self._layer += 1
        self.tensors.append(t)
        return t

    def _build_mlp(self) -> nn.Module:
        d_in = int(np.prod(self.spec.input_shape))
        w = self.spec.width
        return nn.Sequential(
            nn.Flatten(),
            MaskedLinear(self._tensor("fc1", (w, d_in), d_in, "fc")), nn.ReLU(),
            MaskedLinear(self._tensor("fc2", (w, w), w, "fc")), nn.ReLU(),
            MaskedLinear(self._tensor("fc3", (self.spec.num_classes, w), w, "fc", head=True)),
        )

    def _build_cnn(self) -> nn.Module:
        c, h, wd = _image_shape(self.spec.input_shape)
        w = self.spec.width
        flat = 32 * (h // 4) * (wd // 4)
        return nn.Sequential(
            _Reshape((c, h, wd)),
            MaskedConv2d(self._tensor("conv1", (16, c, 5, 5), c * 25, "conv"), padding=2), nn.ReLU(),
            nn.MaxPool2d(2),
            MaskedConv2d(self._tensor("conv2", (32, 16, 5, 5), 16 * 25, "conv"), padding=2), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            MaskedLinear(self._tensor("fc1", (w, flat), flat, "fc")), nn.ReLU(),
            MaskedLinear(self._tensor("fc2", (self.spec.num_classes, w), w, "fc", head=True)),
        )

    def _build_lstm(self) -> nn.Module:
        s = self.spec
        vocab, e, h = s.num_classes, s.embed_dim, s.width
        emb = MaskedEmbedding(self._tensor("embed", (vocab, e), 1, "none"))
        layers = []
        for i, d_in in enumerate((e, h), start=1):
            idx = self._layer
            self._layer += 1
            mih = self._tensor(f"lstm{i}.ih", (3 * h, d_in), d_in, "fc", layer_index=idx)
            mhh = self._tensor(f"lstm{i}.hh", (3 * h, h), h, "fc", layer_index=idx)
            real_ih = frozen_weight(s.seed, f"lstm{i}.ih.real", (h, d_in), d_in, "kaiming_uniform")
            real_hh = frozen_weight(s.seed, f"lstm{i}.hh.real", (h, h), h, "kaiming_uniform")
            layers.append(MaskedLSTMLayer(mih, mhh, real_ih, real_hh, h, s.real_gate))
        head = MaskedLinear(self._tensor("fc", (vocab, h), h, "fc", head=True))
        return _CharLSTM(emb, layers, head)

    # -- forward and penalty ------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.body(x)
        return out

    def group_lasso(self) -> Tensor:
        """Eq. 9 summed over layers, divided by the element count so lambda does not scale with width."""
        total = torch.zeros(())
        for t in self.masked():
            total = total + t.group_lasso()
        return total / self.nbits

    def set_mask_mode(self, mode: str, temperature: float = 1.0, seed: int | None = None) -> None:
        """`seed` seeds the draws of mode "bernoulli" (one generator for the whole model)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for t in self.masked():
            t.mode, t.temperature, t.generator = mode, temperature, gen

    # -- flat views ---------------------------------------------------------------------
    def masked(self) -> list[MaskedTensor]:
        return [t for t in self.tensors if isinstance(t, MaskedTensor) and not t.personal]

    @property
    def nbits(self) -> int:
        return sum(t.weight.numel() for t in self.masked())

    @property
    def num_layers(self) -> int:
        return 1 + max(t.layer_index for t in self.masked())

    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(t.name, t.shape) for t in self.masked()]

    def layout_hash(self) -> str:
        return layout_hash(self.layout())

    def fingerprint(self) -> str:
        return fingerprint((t.name, t.weight.detach().numpy()) for t in self.masked())

    def mask_bits(self) -> np.ndarray:
        return _cat([t.binary_mask() for t in self.masked()])

    def structure_bits(self) -> np.ndarray:
        return _cat([t.structure for t in self.masked()])

    def scores_flat(self) -> np.ndarray:
        return _cat([t.scores.detach() for t in self.masked()]).astype(np.float32)

    def region_of_last_layers(self, k: int) -> np.ndarray:
        """Bit vector: 1 on the elements of the last k layers (the ones one-shot pruning prunes)."""
        first = self.num_layers - k
        return _cat([torch.full(t.shape, t.layer_index >= first) for t in self.masked()])

    def set_structure(self, bits: np.ndarray) -> None:
        for t, part in zip(self.masked(), self._split(bits), strict=True):
            t.structure.copy_(torch.from_numpy(part.astype(bool)))

    def set_scores(self, flat: np.ndarray) -> None:
        with torch.no_grad():
            for t, part in zip(self.masked(), self._split(flat), strict=True):
                t.scores.copy_(torch.from_numpy(part.astype(np.float32)))

    def apply_mask_bits(self, bits: np.ndarray, floor: float = 1e-3) -> None:
        """Adopt received bits: keep each score's magnitude, take its sign from the bit.

        The floor keeps an adopted bit off the threshold, where one tiny step would flip it back.
        (Blending received signs into the scores instead was tried and rejected: magnitudes grow
        round after round, the sigmoid's gradient vanishes and local training stalls; docs/results.md.)
        """
        scores = self.scores_flat()
        sign = np.where(bits.astype(bool), 1.0, -1.0).astype(np.float32)
        self.set_scores(np.maximum(np.abs(scores), floor) * sign)

    def _split(self, flat: np.ndarray) -> list[np.ndarray]:
        if flat.shape != (self.nbits,):
            raise ValueError(f"expected a flat vector of {self.nbits} elements, got shape {flat.shape}")
        parts, offset = [], 0
        for t in self.masked():
            n = t.weight.numel()
            parts.append(flat[offset:offset + n].reshape(t.shape))
            offset += n
        return parts


class _Reshape(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape)


class _CharLSTM(nn.Module):
    def __init__(self, emb: nn.Module, layers: list[MaskedLSTMLayer], head: nn.Module) -> None:
        super().__init__()
        self.emb, self.layers, self.head = emb, nn.ModuleList(layers), head

    def forward(self, x: Tensor) -> Tensor:
        h = self.emb(x)
        for layer in self.layers:
            h = layer(h)
        out: Tensor = self.head(h[:, -1])
        return out


def _image_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) == 3:
        return shape[0], shape[1], shape[2]
    n = int(np.prod(shape))
    side = round(n ** 0.5)
    if side * side != n:
        raise ValueError(f"cnn needs square images; cannot reshape {shape}")
    return 1, side, side


def _cat(parts: list[Tensor]) -> np.ndarray:
    return torch.cat([p.reshape(-1) for p in parts]).numpy()


def build_model(spec: ModelSpec) -> MaskedNet:
    return MaskedNet(spec)
