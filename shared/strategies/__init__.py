"""Federated-learning methods behind one interface (shared/strategies/base.py), one module each.

Adding a strategy: its module (a DeviceHalf and a ServerHalf), a payload encoding in
shared/payloads.py only if none fits, and one line in STRATEGIES below.
"""

from __future__ import annotations

from shared.strategies.base import DeviceHalf, ServerHalf, Strategy, StrategyConfig
from shared.strategies.bnn_fedavg import BNNFedAvgDevice, BNNFedAvgServer
from shared.strategies.fedavg import FedAvgDevice, FedAvgServer
from shared.strategies.fedavg_ft import FedAvgFTDevice, FedAvgFTServer
from shared.strategies.feddst import FedDSTDevice, FedDSTServer
from shared.strategies.fedmask import FedMaskDevice, FedMaskServer
from shared.strategies.lg_fedavg import LGFedAvgDevice, LGFedAvgServer
from shared.strategies.per_fedavg import PerFedAvgDevice, PerFedAvgServer
from shared.strategies.standalone import StandaloneDevice, StandaloneServer
from shared.strategies.topk import TopKDevice, TopKServer
from shared.strategies.zerofl import ZeroFLDevice, ZeroFLServer

STRATEGIES: dict[str, Strategy] = {
    "fedmask": Strategy("fedmask", FedMaskDevice, FedMaskServer,
                        "binary masks over frozen random weights, merged where structures overlap (Li et al. 2021)"),
    "fedavg": Strategy("fedavg", FedAvgDevice, FedAvgServer, "dense weights averaged (McMahan et al. 2017)"),
    "fedavg-ft": Strategy("fedavg-ft", FedAvgFTDevice, FedAvgFTServer,
                          "FedAvg, then every device fine-tunes the final model on its own data"),
    "standalone": Strategy("standalone", StandaloneDevice, StandaloneServer,
                           "local training only, a FedMask device's budget; nothing is sent"),
    "topk": Strategy("topk", TopKDevice, TopKServer,
                     "FedAvg with the top-k update entries sent, error feedback (Stich et al. 2018)"),
    "feddst": Strategy("feddst", FedDSTDevice, FedDSTServer, "sparse weights, dynamic masks (Bibikar et al. 2022)"),
    "zerofl": Strategy("zerofl", ZeroFLDevice, ZeroFLServer, "SWAT training, top-K uploads (Qiu et al. 2022)"),
    "lg-fedavg": Strategy("lg-fedavg", LGFedAvgDevice, LGFedAvgServer, "local body, global head (Liang et al. 2020)"),
    "per-fedavg": Strategy("per-fedavg", PerFedAvgDevice, PerFedAvgServer,
                           "FO-MAML local steps, adapt then evaluate (Fallah et al. 2020)"),
    "bnn-fedavg": Strategy("bnn-fedavg", BNNFedAvgDevice, BNNFedAvgServer,
                           "binary weights, 1 bit up and down, majority vote (FedMask's BNN baseline)"),
}


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}") from None


__all__ = ["STRATEGIES", "DeviceHalf", "ServerHalf", "Strategy", "StrategyConfig", "get_strategy"]
