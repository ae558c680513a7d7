"""What both sides of the pipeline run for a named variant: one function, so they cannot drift.

`fedmask aggregator run --variant V` and `fedmask worker --variant V` both call `variant_setup`: the
aggregator needs the model (its fingerprint and layout), the merge rule and the pruned layers; the
worker needs the same model and the device's FedMaskConfig. Both come from the variant's config as
the simulator runs it (shared/sim/variants.py, through shared.presets.tuned_config), so the pipeline
trains and merges exactly as `run_variant` does.

PRESET_VARIANT is the pipeline's original behaviour, kept as the default: FedMask with the task
preset's training settings and the merge rule given by the operator (--merge, default "head").

What the pipeline does not do: the simulator-only steps of a variant (final local epochs before
evaluation, fedpm's final broadcast); the dense baselines have no pipeline at all.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.device import FedMaskConfig
from shared.models import ModelSpec
from shared.presets import model_spec, preset, tuned_config
from shared.sim.variants import MASK_VARIANTS

PRESET_VARIANT = "preset"
PIPELINE_VARIANTS = (PRESET_VARIANT, *MASK_VARIANTS)
DEFAULT_MERGE = "head"  # the preset variant's rule when --merge is not given


@dataclass(frozen=True)
class VariantSetup:
    variant: str
    spec: ModelSpec
    fedmask: FedMaskConfig
    merge: str
    origin: str  # where the config came from: the task preset, a tuning file, or the variant's default

    @property
    def upload(self) -> str:
        return self.fedmask.upload

    def describe(self) -> str:
        return f"variant {self.variant} (merge {self.merge}, upload {self.upload}; {self.origin})"


def variant_setup(task: str, variant: str = PRESET_VARIANT, *, width: int | None = None, seed: int = 0,
                  merge: str | None = None) -> VariantSetup:
    """The model, device config and merge rule of `variant` on `task`. `merge` overrides the preset
    variant's rule; a named variant brings its own, and another `merge` is an error."""
    if variant == PRESET_VARIANT:
        p = preset(task)
        setup = VariantSetup(variant, model_spec(task, width=width, seed=seed),
                             FedMaskConfig(train=p.mask_train, local_epochs=p.local_epochs),
                             merge or DEFAULT_MERGE, "task preset")
    elif variant in MASK_VARIANTS:
        tuned = tuned_config(task, variant)
        cfg = tuned.config
        rule = cfg.merge or "paper"  # run_variant's fallback
        if merge is not None and merge != rule:
            raise ValueError(f"variant {variant} merges with {rule!r}; drop --merge {merge} (or use "
                             f"--variant {PRESET_VARIANT} to choose the rule)")
        setup = VariantSetup(variant, model_spec(task, width=width, seed=seed).with_(personal_head=cfg.personal_head),
                             cfg.fedmask_config(), rule, tuned.origin)
    else:
        raise ValueError(f"variant {variant!r} has no pipeline; choose one of {', '.join(PIPELINE_VARIANTS)}")
    # A sampled upload is a 1-bit estimate of probabilities: only the agreement rule reads it that way
    # (a majority vote over samples would merge noise). The agreement rule itself takes either upload:
    # over thresholded masks its theta is the fleet's vote share (fedmask-adapt-local).
    # The device must expect what the rule sends down (FedMaskConfig.takes_agreement).
    if (setup.merge == "agreement") != setup.fedmask.takes_agreement:
        raise ValueError(f"merge {setup.merge!r} with upload {setup.upload!r}: the agreement rule goes together "
                         "with sampled uploads or a per-device share (use --variant fedmask-agree, fedmask-adapt, "
                         "fedmask-adapt-local or fedpm)")
    return setup
