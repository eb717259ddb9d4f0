"""CellMetrics and MetricsReportSaver in a real MONAI SupervisedEvaluator, TensorBoard scalars read back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator
from monai.handlers import CheckpointSaver, TensorBoardStatsHandler

from cellgap.metrics import Protocol, ScoreTable, score_image, summarize
from cellgap.metrics.handlers import CellMetrics, MetricsReportSaver
from cellgap.testing.synthetic_pairs import perturb, perturb_classes, random_classes, random_instances

CLASSES = ("neoplastic", "inflammatory")


def make_items(n=5):
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        gt = random_instances((48, 48), 0 if i == 2 else 6, rng)  # item 2: no GT cell
        gc = random_classes(gt, 2, rng)
        pred = perturb(gt, rng)
        pc = perturb_classes(pred, gc, 2, rng)
        items.append({"image": np.zeros((3, 48, 48), np.float32), "label": gt[None].astype(np.int32),
                      "classes": gc[None], "pred_label": pred[None].astype(np.int32), "pred_classes": pc[None],
                      "id": f"tile{i}", "tissue": "breast" if i % 2 else "colon"})
    return items


class ToyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 1)

    def forward(self, x):
        return self.conv(x)


def copy_to_output(item: dict) -> dict:
    """Stand-in for CISCAPostProcessingd: the precomputed prediction and the GT go into the output keys."""
    item = dict(item)
    item["pred_instances"] = torch.as_tensor(item["pred_label"])
    item["pred_types"] = torch.as_tensor(item["pred_classes"])
    item["gt_instances"] = torch.as_tensor(item["label"])
    item["gt_types"] = torch.as_tensor(item["classes"])
    return item


def expected_summary(items, protocol):
    scores = [score_image(it["label"], it["pred_label"], it["classes"], it["pred_classes"], num_classes=2, protocol=protocol,
                          image_id=it["id"], tissue=it["tissue"]) for it in items]
    return summarize(ScoreTable.from_scores(scores, CLASSES), protocol)


@pytest.mark.parametrize("key", ["mpq+", "pq"])
def test_evaluator_key_metric_tensorboard_checkpoint_and_reports(tmp_path, key):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    items = make_items()
    net = ToyNet()
    metric = CellMetrics(CLASSES, key_metric=key, magnification=40, empty_policy="nan", protocol_kwargs={"split": "val"})
    saver = MetricsReportSaver(str(tmp_path / "reports"), bootstrap=50, extra={"encoder": "toy"})
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(items), batch_size=2),
        network=net,
        postprocessing=copy_to_output,
        key_val_metric={"val_score": metric},
        val_handlers=[
            TensorBoardStatsHandler(log_dir=str(tmp_path / "tb"), output_transform=lambda x: None),
            CheckpointSaver(save_dir=str(tmp_path / "ckpt"), save_dict={"net": net}, save_key_metric=True),
            saver,
        ],
    )
    evaluator.run()

    protocol = Protocol(magnification=40, empty_policy="nan", split="val")
    expected = expected_summary(items, protocol)
    metrics = evaluator.state.metrics
    assert metrics["val_score"] == pytest.approx(expected[key])
    assert evaluator.state.best_metric == pytest.approx(expected[key])
    for name in ("pq", "bpq", "mpq", "mpq+", "f1d", "aji", "aji+", "dice", "r2", "pq+/neoplastic", "f1/inflammatory"):
        value = metrics[name]
        assert (np.isnan(value) and np.isnan(expected[name])) or value == pytest.approx(expected[name]), name
    assert metrics["n_images"] == 5 and metrics["n_empty"] == 1

    # TensorBoard: the headline and per-class scalars were written at the epoch.
    event_files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(event_files[0]))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("val_score", "pq", "mpq+", "f1d", "pq+/neoplastic", "f1/inflammatory", "r2/neoplastic"):
        assert tag in tags, tag
    assert acc.Scalars("mpq+")[0].value == pytest.approx(expected["mpq+"], abs=1e-6)
    assert acc.Scalars("pq+/inflammatory")[0].value == pytest.approx(expected["pq+/inflammatory"], abs=1e-6)

    # CheckpointSaver kept the best model by the key metric.
    assert any("key_metric" in p.name for p in (tmp_path / "ckpt").iterdir())

    # Reports at the end of the run.
    doc = json.loads((tmp_path / "reports" / "summary.json").read_text())
    assert doc["protocol"]["empty_policy"] == "nan" and doc["protocol"]["split"] == "val"
    assert doc["run"]["encoder"] == "toy" and doc["run"]["key_metric"] == key
    assert doc["metrics"]["mpq+"] == pytest.approx(expected["mpq+"])
    per_image = (tmp_path / "reports" / "per_image.csv").read_text().splitlines()
    assert len(per_image) == 6 and per_image[1].startswith("tile0,colon,False")


def test_metric_resets_between_epochs_and_works_without_decollate(tmp_path):
    items = make_items(4)
    metric = CellMetrics(CLASSES, key_metric="f1d", protocol=Protocol.cisca(magnification=40))
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=DataLoader(Dataset(items), batch_size=4),
                                    network=ToyNet(), postprocessing=copy_to_output, key_val_metric={"f1": metric},
                                    decollate=True)
    evaluator.run()
    first = evaluator.state.metrics["f1"]
    evaluator.run()  # a second evaluation must not accumulate the first one's images
    assert evaluator.state.metrics["f1"] == first and len(metric.table) == 4
    # Batched (decollate=False style) output dicts are split per item.
    metric.reset()
    batch = {k: torch.stack([torch.as_tensor(copy_to_output(it)[k]) for it in items])
             for k in ("pred_instances", "pred_types", "gt_instances", "gt_types")}
    batch["id"] = [it["id"] for it in items]
    metric.update(batch)
    assert metric.compute()["f1d"] == pytest.approx(first)


def test_single_class_ignores_type_maps_and_bad_items_name_the_image():
    metric = CellMetrics(["nucleus"], key_metric="aji", detection_radius=6)
    gt = np.zeros((1, 16, 16), np.int32)
    gt[0, 2:6, 2:6] = 1
    metric.update([{"pred_instances": gt, "gt_instances": gt, "id": "a"}])
    assert metric.compute()["aji"] == 1.0
    with pytest.raises(ValueError, match=r"item 1 \(id 'b'\): shape mismatch"):
        metric.update([{"pred_instances": gt[:, :8], "gt_instances": gt, "id": "b"}])
    with pytest.raises(KeyError, match="missing \\['gt_instances'\\]"):
        metric.update([{"pred_instances": gt}])


def test_constructor_validation():
    with pytest.raises(ValueError, match="key_metric"):
        CellMetrics(CLASSES, key_metric="accuracy", magnification=40)
    with pytest.raises(ValueError, match="class_names"):
        CellMetrics("neoplastic", magnification=40)
    with pytest.raises(ValueError, match="not both"):
        CellMetrics(CLASSES, protocol=Protocol.pannuke(), magnification=20)
    with pytest.raises(ValueError, match="give magnification, mpp or detection_radius"):
        CellMetrics(CLASSES)
    assert CellMetrics(CLASSES, key_metric="mPQ_plus", mpp=0.5).key_metric == "mpq+"


def test_report_saver_without_metric_names_the_problem(tmp_path):
    from ignite.engine import Engine

    engine = Engine(lambda e, b: None)
    saver = MetricsReportSaver(str(tmp_path), metric_name="val_pq")
    with pytest.raises(KeyError, match="no CellMetrics named 'val_pq'"):
        saver(engine)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    items = make_items(5)
    mine = items[rank::world]
    if rank == 1:
        mine = mine + [items[0]]  # DistributedSampler-style padding: a repeated image must count once
    metric = CellMetrics(CLASSES, key_metric="mpq+", magnification=40, empty_policy="nan")
    metric.update([copy_to_output(it) | {"id": it["id"], "tissue": it["tissue"]} for it in mine])
    result = metric.compute()
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({k: v for k, v in result.items() if "/" not in k}))
    dist.destroy_process_group()


@pytest.mark.heavy
def test_ddp_ranks_gather_every_image_once(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    expected = expected_summary(make_items(5), Protocol(magnification=40, empty_policy="nan"))
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["n_images"] == 5
        for key in ("pq", "mpq+", "f1d", "aji+"):
            assert got[key] == pytest.approx(expected[key]), (rank, key)
