"""Tiny datasets in each native format, generated on the fly (no downloads).

Tests, benchmarks and bundle smoke runs use these to exercise the real converters:
:func:`write_pannuke`, :func:`write_conic`, :func:`write_cytodark0`, :func:`write_folder`, or
:func:`write_native` by dataset name.  Each returns the raw folder to pass to the converter.
:func:`overlapping_ellipses` draws crowded instance maps for target and post-processing tests.
The pictures are crude (discs on a textured background) but have the exact file layout, dtypes
and shapes of the real releases.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.draw import disk

PANNUKE_TISSUES = ("Adrenal_gland", "Bile-duct", "Bladder", "Breast", "Cervix", "Colon", "Esophagus", "HeadNeck",
                   "Kidney", "Liver", "Lung", "Ovarian", "Pancreatic", "Prostate", "Skin", "Stomach", "Testis",
                   "Thyroid", "Uterus")
CONIC_COHORTS = ("consep", "crag", "dpath", "glas", "pannuke")


def overlapping_ellipses(rng: np.random.Generator, size: int, num_cells: int, radius: tuple[float, float]) -> np.ndarray:
    """(size, size) int32 instance map of ``num_cells`` random ellipses (semi-axes drawn from ``radius``),
    painted in order so that later cells cover earlier ones: crowded, mostly touching cells for target
    and post-processing tests and benchmarks."""
    label = np.zeros((size, size), dtype=np.int32)
    rows, cols = np.ogrid[:size, :size]
    for cell in range(1, num_cells + 1):
        r0, c0 = rng.uniform(0, size, 2)
        a, b = rng.uniform(*radius, 2)
        angle = rng.uniform(0, np.pi)
        dr, dc = rows - r0, cols - c0
        u = (dr * np.cos(angle) + dc * np.sin(angle)) / a
        v = (-dr * np.sin(angle) + dc * np.cos(angle)) / b
        label[u**2 + v**2 <= 1] = cell
    return label


def random_instances(rng: np.random.Generator, shape: tuple[int, int], n_cells: int, radius: tuple[int, int] = (3, 8)) -> np.ndarray:
    """An int32 instance map of ``n_cells`` random discs (later discs cover earlier ones)."""
    label = np.zeros(shape, np.int32)
    for k in range(1, n_cells + 1):
        r = int(rng.integers(radius[0], radius[1] + 1))
        centre = (int(rng.integers(0, shape[0])), int(rng.integers(0, shape[1])))
        rr, cc = disk(centre, r, shape=shape)
        label[rr, cc] = k
    present = np.unique(label)
    lut = np.zeros(n_cells + 1, np.int32)
    lut[present] = np.arange(len(present))
    return lut[label]


def stained_image(rng: np.random.Generator, label: np.ndarray, cell_rgb=(95, 60, 150), background_rgb=(235, 190, 215)) -> np.ndarray:
    """A uint8 RGB picture: smooth textured background, darker cells, pixel noise."""
    h, w = label.shape
    coarse = rng.normal(0, 1, (max(2, h // 16), max(2, w // 16), 3))
    texture = ndimage.zoom(coarse, (h / coarse.shape[0], w / coarse.shape[1], 1), order=1)[:h, :w]
    base = np.where((label > 0)[..., None], np.asarray(cell_rgb, float), np.asarray(background_rgb, float))
    image = base + 12 * texture + rng.normal(0, 4, (h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------- PanNuke


def write_pannuke(root: str | os.PathLike, tiles_per_fold: Sequence[int] = (8, 8, 8), size: int = 64, seed: int = 0,
                  tissues: Sequence[str] = PANNUKE_TISSUES[:3], dtype: str = "float64", cells: tuple[int, int] = (0, 12),
                  overlap_every: int = 4) -> Path:
    """PanNuke fold folders ``Fold k/images/foldk/{images,types}.npy`` and ``Fold k/masks/foldk/masks.npy``.

    Images and masks are stored as ``dtype`` (the release uses float64).  Class channels hold
    per-channel ids as in the release; every ``overlap_every``-th tile gets one cell that overlaps
    a cell of another channel (0 disables).  Tissues cycle through ``tissues``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for fold, n in enumerate(tiles_per_fold, start=1):
        img_dir = root / f"Fold {fold}" / "images" / f"fold{fold}"
        mask_dir = root / f"Fold {fold}" / "masks" / f"fold{fold}"
        img_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        images = np.lib.format.open_memmap(img_dir / "images.npy", mode="w+", dtype=dtype, shape=(n, size, size, 3))
        masks = np.lib.format.open_memmap(mask_dir / "masks.npy", mode="w+", dtype=dtype, shape=(n, size, size, 6))
        types = np.array([tissues[i % len(tissues)] for i in range(n)])
        for i in range(n):
            label = random_instances(rng, (size, size), int(rng.integers(cells[0], cells[1] + 1)))
            channel = rng.integers(0, 5, int(label.max()) + 1)[label]
            tile = np.zeros((size, size, 6), dtype)
            for c in range(5):
                tile[..., c] = np.where((label > 0) & (channel == c), label, 0)  # ids unique across channels, as in the release
            if overlap_every and i % overlap_every == 0:
                rr, cc = disk((size // 2, size // 2), max(3, size // 10), shape=(size, size))
                tile[rr, cc, 4] = label.max() + 1  # an epithelial cell on top of whatever is there
                tile[rr[: len(rr) // 3], cc[: len(cc) // 3], 0] = label.max() + 2  # a neoplastic one overlapping it
            tile[..., 5] = (tile[..., :5].sum(axis=2) == 0)
            masks[i] = tile
            images[i] = stained_image(rng, label)
        images.flush()
        masks.flush()
        del images, masks
        np.save(img_dir / "types.npy", types)
    return root


# ----------------------------------------------------------------------------------------- CoNIC


def write_conic(root: str | os.PathLike, sources_per_cohort: int = 3, patches_per_source: int = 2, size: int = 64,
                seed: int = 0, cohorts: Sequence[str] = CONIC_COHORTS, cells: tuple[int, int] = (0, 10)) -> Path:
    """CoNIC challenge files: ``images.npy`` (uint8), ``labels.npy`` (uint16, instance + class),
    ``patch_info.csv`` (``<cohort>_<k>-<patch>``) and ``counts.csv``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"{c}_{s}-{p:04d}" for c in cohorts for s in range(1, sources_per_cohort + 1) for p in range(patches_per_source)]
    n = len(names)
    images = np.zeros((n, size, size, 3), np.uint8)
    labels = np.zeros((n, size, size, 2), np.uint16)
    counts = np.zeros((n, 6), np.int64)
    for i in range(n):
        label = random_instances(rng, (size, size), int(rng.integers(cells[0], cells[1] + 1)))
        cls = rng.integers(1, 7, int(label.max()) + 1)
        cls[0] = 0
        labels[i, ..., 0] = label
        labels[i, ..., 1] = cls[label]
        images[i] = stained_image(rng, label)
        counts[i] = np.bincount(cls[1:], minlength=7)[1:]
    np.save(root / "images.npy", images)
    np.save(root / "labels.npy", labels)
    with open(root / "patch_info.csv", "w", newline="") as f:
        f.write("patch_info\n" + "\n".join(names) + "\n")
    with open(root / "counts.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["neutrophil", "epithelial", "lymphocyte", "plasma", "eosinophil", "connective"])
        writer.writerows(counts.tolist())
    return root


# ------------------------------------------------------------------------------------- CytoDArk0


def cytodark0_name(image_id: int) -> str:
    return f"ID{image_id:02d}_section"


def write_cytodark0(root: str | os.PathLike, magnification: int = 20, image_ids: Sequence[int] = (1, 2, 3, 5, 54, 55, 56, 60, 61, 62),
                    size: int = 512, seed: int = 0, folds: bool = True, smaller_tier: int | None = 256,
                    cells: tuple[int, int] = (20, 60)) -> Path:
    """CytoDArk0 tier folders ``cytoDArk0/<mag>x/<S>x<S>/{image/*.png, label/*.tiff, folds.csv}``.

    The release has 1024² images at 20x and 2048² at 40x; tests use a smaller ``size``.  An extra
    ``smaller_tier`` folder (non-overlapping tiles of the full images) mimics the release's other tiers.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    import tifffile

    tiers = [size] + ([smaller_tier] if smaller_tier else [])
    for s in tiers:
        for sub in ("image", "label"):
            (root / "cytoDArk0" / f"{magnification}x" / f"{s}x{s}" / sub).mkdir(parents=True, exist_ok=True)
    fold_rows = []
    for image_id in image_ids:
        name = cytodark0_name(image_id)
        label = random_instances(rng, (size, size), int(rng.integers(cells[0], cells[1] + 1)), radius=(4, 12))
        image = stained_image(rng, label, cell_rgb=(70, 40, 120), background_rgb=(225, 220, 235))
        tier = root / "cytoDArk0" / f"{magnification}x" / f"{size}x{size}"
        Image.fromarray(image).save(tier / "image" / f"{name}.png")
        tifffile.imwrite(tier / "label" / f"{name}.tiff", label.astype(np.uint16))
        fold_rows.append((name, 2 if image_id in (5, 55, 60, 62) else 0))
        if smaller_tier:
            small = root / "cytoDArk0" / f"{magnification}x" / f"{smaller_tier}x{smaller_tier}"
            k = 0
            for r in range(0, size, smaller_tier):
                for c in range(0, size, smaller_tier):
                    k += 1
                    Image.fromarray(image[r : r + smaller_tier, c : c + smaller_tier]).save(small / "image" / f"{name}_{k}.png")
                    tifffile.imwrite(small / "label" / f"{name}_{k}.tiff", label[r : r + smaller_tier, c : c + smaller_tier].astype(np.uint16))
    if folds:
        with open(root / "cytoDArk0" / f"{magnification}x" / f"{size}x{size}" / "folds.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["img_id", "fold"])
            writer.writerows(fold_rows)
    return root


# ---------------------------------------------------------------------------------- user folders


def write_folder(root: str | os.PathLike, n_images: int = 6, size: int = 64, seed: int = 0, label_format: str = "tif",
                 classes: str | None = "map", class_names: Sequence[str] = ("tumour", "immune"), split: bool = False,
                 config: bool = True, image_format: str = "png", tissues: Sequence[str] = ("a", "b")) -> Path:
    """A user folder: ``images/*.png|tif``, ``labels/*.tif|png|nii.gz`` and optionally ``classes/``
    (``classes="map"``: class maps; ``"csv"``: ``instance_id,class``; ``"csv_names"``:
    ``instance_id,class_name``; ``None``: single class), ``split.csv`` and ``cellgap.json``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    import tifffile

    for sub in ("images", "labels") + (("classes",) if classes else ()):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_images):
        name = f"tile_{i:03d}"
        label = random_instances(rng, (size, size), int(rng.integers(1, 10)))
        image = stained_image(rng, label)
        if image_format == "png":
            Image.fromarray(image).save(root / "images" / f"{name}.png")
        else:
            tifffile.imwrite(root / "images" / f"{name}.tif", image)
        if label_format == "tif":
            tifffile.imwrite(root / "labels" / f"{name}.tif", label.astype(np.uint16))
        elif label_format == "png":
            Image.fromarray(label.astype(np.uint16)).save(root / "labels" / f"{name}.png")
        elif label_format == "nii":
            import nibabel as nib

            nib.save(nib.Nifti1Image(label.astype(np.int16), np.eye(4)), str(root / "labels" / f"{name}.nii.gz"))
        else:
            raise ValueError(f"label_format: expected tif, png or nii, got {label_format!r}")
        cls = rng.integers(1, len(class_names) + 1, int(label.max()) + 1)
        cls[0] = 0
        if classes == "map":
            tifffile.imwrite(root / "classes" / f"{name}.tif", cls[label].astype(np.uint8))
        elif classes in ("csv", "csv_names"):
            with open(root / "classes" / f"{name}.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["instance_id", "class" if classes == "csv" else "class_name"])
                for k in range(1, int(label.max()) + 1):
                    writer.writerow([k, cls[k] if classes == "csv" else class_names[cls[k] - 1]])
        rows.append((name, ("train", "train", "val", "test")[i % 4], tissues[i % len(tissues)]))
    if split:
        with open(root / "split.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "split", "tissue"])
            writer.writerows(rows)
    if config:
        names = list(class_names) if classes else ["cell"]
        (root / "cellgap.json").write_text(json.dumps({"name": "my_tiles", "class_names": names, "magnification": 40,
                                                       "mpp": 0.25}, indent=2))
    return root


def write_native(name: str, root: str | os.PathLike, **options) -> Path:
    """Write a tiny native dataset of ``name`` (pannuke, conic, cytodark0, folder) under ``root``."""
    writers = {"pannuke": write_pannuke, "conic": write_conic, "cytodark0": write_cytodark0, "folder": write_folder}
    if name not in writers:
        raise ValueError(f"name: expected one of {sorted(writers)}, got {name!r}")
    return writers[name](root, **options)
