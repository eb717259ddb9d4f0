"""The bundle configs are configuration, not programs in strings: the logic lives in cellgap.workflow, the
configs hold options, references and ``_target_`` entries (issue #18)."""

import ast
import json
import re
from pathlib import Path

import pytest

from cellgap.bundle import bundle_name
from cellgap.encoders import ENCODERS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "bundles").glob("*/configs/*.json"))
TRAIN_LINES_BEFORE = 442  # train.json before the redesign
MAX_EXPRESSION_SHARE = 0.10


def _values(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _values(value)
    elif isinstance(node, list):
        for value in node:
            yield from _values(value)
    else:
        yield node


def expression_share(config: dict) -> float:
    """Characters of ``$`` expressions over all value characters (non-strings as their JSON text)."""
    values = list(_values(config))
    total = sum(len(v) if isinstance(v, str) else len(json.dumps(v)) for v in values)
    expressions = sum(len(v) for v in values if isinstance(v, str) and v.startswith("$"))
    return expressions / total


def expression_trees(config: dict):
    """Each ``$`` expression parsed as Python (``@a#b`` references become names)."""
    for value in _values(config):
        if isinstance(value, str) and value.startswith("$") and not value.startswith("$import"):
            code = re.sub(r"@([\w#]+)", lambda m: "ref_" + m.group(1).replace("#", "_"), value[1:])
            yield value, ast.parse(code, mode="eval")


def test_every_bundle_config_is_found():
    assert len(CONFIGS) == 6 * len(ENCODERS)  # metadata, train, evaluate, inference, multi_gpu_train, segment


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parents[1].name}/{p.name}")
def test_no_lambda_no_conditional_no_position_lookup(path):
    config = json.loads(path.read_text(encoding="utf-8"))
    for text, tree in expression_trees(config):
        kinds = {type(node).__name__ for node in ast.walk(tree)}
        assert not kinds & {"Lambda", "IfExp", "BoolOp"}, f"{path}: {text!r} holds logic; move it into cellgap.workflow"
    references = [v for v in _values(config) if isinstance(v, str) and "@" in v]
    assert not [r for r in references if re.search(r"@[\w#]*#\d", r)], f"{path}: a list entry referenced by position"


@pytest.mark.parametrize("key", sorted(ENCODERS))
def test_train_config_is_short_and_mostly_plain_values(key):
    path = ROOT / "bundles" / bundle_name(key) / "configs" / "train.json"
    assert len(path.read_text(encoding="utf-8").splitlines()) <= TRAIN_LINES_BEFORE // 2
    assert expression_share(json.loads(path.read_text(encoding="utf-8"))) <= MAX_EXPRESSION_SHARE


@pytest.mark.parametrize("key", sorted(ENCODERS))
def test_all_workflow_configs_together_are_mostly_plain_values(key):
    """train, evaluate, multi_gpu_train, inference and segment: their value characters pooled (metadata.json excluded)."""
    configs = [json.loads(p.read_text(encoding="utf-8"))
               for p in sorted((ROOT / "bundles" / bundle_name(key) / "configs").glob("*.json")) if p.name != "metadata.json"]
    assert len(configs) == 5
    assert expression_share({"configs": configs}) <= MAX_EXPRESSION_SHARE


def test_expression_share_counts_expression_characters():
    assert expression_share({"a": "$@x", "b": "abc", "c": [1, None]}) == pytest.approx(3 / (3 + 3 + 1 + 4))


def test_candidate_min_cell_sizes_are_a_builder_option():
    """The study scores several minimum cell sizes through one option, not by editing the configs."""
    from cellgap.workflow import CandidateOutput, validation_postprocessing

    single = validation_postprocessing(40, 12, 3)
    assert [type(t).__name__ for t in single.transforms] == ["CISCAPostProcessingd", "CopyItemsd"]
    several = validation_postprocessing(40, 12, 3, min_cell_size_candidates=[20, 10, 20])
    cells = several.transforms[:-1]
    assert [(t.options["min_cell_size"], t.instance_key, t.type_key, t.cells_key) for t in cells] == [
        (10, "pred_instances_min10", "pred_types_min10", "pred_cells_min10"),
        (20, "pred_instances_min20", "pred_types_min20", "pred_cells_min20")]
    assert CandidateOutput(20)({"pred_instances_min20": 1, "pred_instances": 0})["pred_instances"] == 1
    with pytest.raises(ValueError, match="min_cell_size_candidates"):
        validation_postprocessing(40, 12, 3, min_cell_size_candidates=[0, 5])
