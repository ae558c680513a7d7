"""shared/variant_setup.py: the pipeline's aggregator and workers build what the simulator runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared import codec
from shared.amqp import AmqpSettings, Delivery
from shared.device import FedMaskConfig
from shared.models import build_model
from shared.presets import model_spec, preset, tuned_config
from shared.variant_setup import PIPELINE_VARIANTS, variant_setup
from worker.runtime import Worker, WrongVariant


def test_the_preset_variant_is_the_pipelines_original_setup() -> None:
    s = variant_setup("digits", width=32, seed=3)
    p = preset("digits")
    assert s.spec == model_spec("digits", width=32, seed=3)
    assert s.fedmask == FedMaskConfig(train=p.mask_train, local_epochs=p.local_epochs)
    assert s.merge == "head" and s.upload == "threshold"
    assert variant_setup("digits", merge="body").merge == "body"


@pytest.mark.parametrize("variant", [v for v in PIPELINE_VARIANTS if v != "preset"])
def test_a_named_variant_is_run_variants_config(variant: str) -> None:
    """The same spec (personal head included), FedMaskConfig and rule as shared.sim.variants.run_variant."""
    cfg = tuned_config("digits", variant).config
    s = variant_setup("digits", variant, width=32, seed=0)
    assert s.spec == model_spec("digits", width=32, seed=0).with_(personal_head=cfg.personal_head)
    assert s.fedmask == cfg.fedmask_config() and s.merge == (cfg.merge or "paper")


def test_agreement_variant_has_its_own_model_and_downlink() -> None:
    agree, plain = variant_setup("digits", "fedmask-agree", width=32), variant_setup("digits", width=32)
    assert agree.spec.personal_head and agree.upload == "sample" and agree.merge == "agreement"
    assert agree.fedmask.train.mask_mode == "bernoulli"
    # The personal head is outside the wire layout: a worker of the other variant is refused by layout.
    assert build_model(agree.spec).layout_hash() != build_model(plain.spec).layout_hash()


def test_refused_combinations() -> None:
    with pytest.raises(ValueError, match="merges with 'agreement'"):
        variant_setup("digits", "fedmask-agree", merge="head")
    with pytest.raises(ValueError, match="goes together"):
        variant_setup("digits", merge="agreement")  # threshold uploads under the agreement rule
    with pytest.raises(ValueError, match="no pipeline"):
        variant_setup("digits", "fedavg")


@pytest.mark.parametrize("variant", ["fedmask-agree", "fedmask-adapt-local"])
def test_a_worker_of_an_agreement_variant_refuses_delta_coding(tmp_path: Path, variant: str) -> None:
    """Delta coding needs a bit mask both sides hold; the agreement downlink is theta levels. The device
    would quietly send raw bits, so the worker says so at start (before loading any data)."""
    from ops.fleet.board import board_worker

    with pytest.raises(ValueError, match="drop --coding delta"):
        board_worker("d0", profile="jetson", task="digits", amqp_url="amqp://127.0.0.1/", state_dir=tmp_path,
                     width=32, seed=0, variant=variant, coding="delta")


@pytest.mark.parametrize(("variant", "enc"), [("preset", "q4"), ("fedpm", "structure")])
def test_a_worker_stops_on_a_downlink_of_another_variant(tmp_path: Path, variant: str, enc: str) -> None:
    """fedpm and the preset share one model, so only the downlink's encoding shows the mismatch:
    the worker dead-letters the mask and stops (its `run` then raises the recorded WrongVariant)."""
    s = variant_setup("digits", variant, width=32)
    w = Worker("d0", s.spec, s.fedmask, (np.zeros((0, 64), np.float32), np.zeros(0, np.int64)),
               amqp=AmqpSettings.from_url("amqp://127.0.0.1/"), state_dir=tmp_path, seed=0, variant=variant)
    nbits = 4 if enc == "q4" else 1
    mask = codec.make_mask(device="d0", round=1, model=w.device.fingerprint, layout=w.device.layout,
                           bits=b"\x80", nbits=nbits, version=1, enc=enc)  # type: ignore[arg-type]
    out = w.on_delivery(Delivery("device.d0", "fedmask-aggregator", codec.encode(mask), {}, False, 1))
    assert (out.action, out.reason) == ("reject", "wrong_variant") and w.stop_event.is_set()
    assert isinstance(w.failure, WrongVariant) and f"variant {variant}" in str(w.failure)
    assert w.device.mask_version == 0  # nothing applied


def test_the_cli_offers_exactly_the_pipeline_variants() -> None:
    from ops.cli.pipeline import VARIANTS

    assert tuple(VARIANTS.choices) == PIPELINE_VARIANTS
