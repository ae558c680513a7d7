"""One error tree for the project: adapters translate library exceptions into these at the boundary."""

from __future__ import annotations


class FedMaskError(Exception):
    """Base class of every error the project raises on purpose."""


class ConfigError(FedMaskError):
    """A setting is missing or out of range."""


class DatasetUnavailable(FedMaskError):
    """A dataset's source package is not installed (the message names it and how to install it)."""


class CodecError(FedMaskError):
    """A message could not be decoded or failed validation; `reason` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class LayoutMismatch(FedMaskError):
    """Two parties disagree on the model's layout or frozen-weight fingerprint."""
