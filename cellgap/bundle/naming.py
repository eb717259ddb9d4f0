"""A bundle's folder name and release version."""

from __future__ import annotations

from ..encoders import EncoderSpec, get_encoder_spec

BUNDLE_PREFIX = "cisca_"
BUNDLE_VERSION = "0.1.0"


def bundle_name(spec: EncoderSpec | str) -> str:
    return BUNDLE_PREFIX + get_encoder_spec(spec).key
