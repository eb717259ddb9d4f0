"""SaveCellOutputsd: the files written for one tile, whatever device the post-processed maps are on."""

import numpy as np
import pytest
import tifffile
import torch

from cellgap.export import SaveCellOutputsd


class _DeviceTensor(torch.Tensor):
    """Stands in for a CUDA tensor (CI has no GPU): numpy refuses it, as it refuses CUDA memory, until ``.cpu()``."""

    def __array__(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host memory first.")

    def numpy(self, *args, **kwargs):
        return self.__array__()

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor)


def _item(wrap=lambda t: t):
    instances = torch.zeros(1, 32, 32, dtype=torch.int32)
    instances[0, 4:12, 4:12] = 1
    instances[0, 16:28, 18:30] = 2
    types = torch.where(instances == 1, 1, torch.where(instances == 2, 2, 0)).to(torch.uint8)
    cells = [{"id": 1, "class": 1, "class_prob": 0.9, "centroid": (7.5, 7.5), "area": 64},
             {"id": 2, "class": 2, "class_prob": 0.8, "centroid": (21.5, 23.5), "area": 144}]
    return {"id": "tile", "image": wrap(torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))), "pred_instances": wrap(instances),
            "pred_types": wrap(types), "pred_cells": cells}


def test_the_stand_in_refuses_numpy_like_a_cuda_tensor():
    with pytest.raises(TypeError, match="cuda"):
        np.asarray(torch.zeros(2).as_subclass(_DeviceTensor))


def test_maps_on_the_gpu_are_written_like_maps_on_the_cpu(tmp_path):
    # A GPU evaluator's post-processing leaves pred_instances/pred_types on CUDA (they follow the network
    # output); SaveCellOutputsd used np.asarray on them, which numpy refuses for CUDA memory.
    save = SaveCellOutputsd(tmp_path / "cpu", class_names=["a", "b"])
    save_gpu = SaveCellOutputsd(tmp_path / "gpu", class_names=["a", "b"])
    written = save(_item())["written"]
    written_gpu = save_gpu(_item(lambda t: t.as_subclass(_DeviceTensor)))["written"]
    assert set(written) == set(written_gpu) == {"instances", "classes", "cells", "overlay", "geojson"}
    for key in ("instances", "classes"):
        cpu, gpu = tifffile.imread(written[key]), tifffile.imread(written_gpu[key])
        assert cpu.dtype == gpu.dtype and np.array_equal(cpu, gpu)
    assert np.unique(tifffile.imread(written["instances"])).tolist() == [0, 1, 2]
    for key in ("cells", "geojson", "overlay"):
        assert open(written[key], "rb").read() == open(written_gpu[key], "rb").read()
