"""MONAI bundles generated from the encoder registry.

Every encoder gets ``bundles/cisca_<key>/`` with the same configs apart from its encoder-specific fields, so
the templates here are the source of truth:

- :mod:`.configs`: train / evaluate / inference / multi-GPU config dicts;
- :mod:`.documents`: metadata.json, the README, the licence, logging.conf, large_files.yml;
- :mod:`.json_layout`: the JSON layout of the written configs;
- :mod:`.naming`: a bundle's folder name and version;
- :mod:`.render`: one bundle's files, written to ``bundles/`` by ``scripts/build_bundles.py``;
- :mod:`.zoo`: the model-zoo archive with the library vendored (``scripts/export_bundle.py``).
"""

from .configs import evaluate_config, inference_config, multi_gpu_config, train_config
from .documents import LARGE_FILES, LOGGING_CONF, PINNED, SCHEMA_URL, license_text, metadata, readme
from .json_layout import json_text
from .naming import BUNDLE_PREFIX, BUNDLE_VERSION, bundle_name
from .render import all_bundle_keys, render_bundle, write_bundle
from .zoo import VENDORED, export_bundle

__all__ = [
    "BUNDLE_PREFIX", "BUNDLE_VERSION", "LARGE_FILES", "LOGGING_CONF", "PINNED", "SCHEMA_URL", "VENDORED",
    "all_bundle_keys", "bundle_name", "evaluate_config", "export_bundle", "inference_config", "json_text",
    "license_text", "metadata", "multi_gpu_config", "readme", "render_bundle", "train_config", "write_bundle",
]
