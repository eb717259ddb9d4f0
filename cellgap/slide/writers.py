"""A slide's final outputs, streamed tile by tile from the journal (a slide's cells never wait in RAM):

* ``cells.geojson`` (or ``cells.geojson.gz``): a FeatureCollection of QuPath detections — Polygon geometry in
  level-0 pixels, ``objectType`` ``detection``, ``classification`` {``name``, ``color``}, ``measurements``
  {``area_um2``, ``class_prob``}, ``name`` the cell's table id; every polygon valid (shapely), readable by geopandas;
* ``cells.csv`` and ``cells.parquet``: one row per cell (:data:`CELL_COLUMNS`);
* ``labels.zarr`` (optional): the instance labels at the processing resolution, chunked;
* ``overlay.png``: the thumbnail with every cell's outline in its class colour.

Each file is written under a temporary name and renamed into place by :meth:`SlideWriters.commit`; the run writes
``summary.json`` last, so a slide folder without it is unfinished whatever else it holds.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from ..visualization import CLASS_COLOURS, save_png
from .cells import TileCells

CELL_COLUMNS = ("id", "x_px", "y_px", "x_um", "y_um", "area_px", "area_um2", "class_id", "class_name", "class_prob",
                "tile", "cut")
PARQUET_ROWS = 65_536  # rows per Parquet row group


def class_colour(class_id: int) -> list[int]:
    return CLASS_COLOURS[(max(int(class_id), 1) - 1) % len(CLASS_COLOURS)].tolist()


def output_names(gzip_geojson: bool) -> dict[str, str]:
    return {"geojson": "cells.geojson.gz" if gzip_geojson else "cells.geojson", "csv": "cells.csv",
            "parquet": "cells.parquet", "overlay": "overlay.png"}


class SlideWriters:
    """Writers of one slide's cell outputs into ``folder`` (temporary names until :meth:`commit`)."""

    def __init__(self, folder: str | os.PathLike, class_names: list[str], level0_mpp: float, thumbnail: np.ndarray,
                 thumbnail_downsample: float, gzip_geojson: bool = False,
                 labels_shape: tuple[int, int] | None = None, labels_chunk: int = 1024, name: str = "slide"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.folder = Path(folder)
        self.slide = name
        self.class_names = list(class_names)
        self.level0_mpp = level0_mpp
        self.names = output_names(gzip_geojson)
        self.tmp = {k: self.folder / f".{name}.tmp" for k, name in self.names.items()}
        raw = open(self.tmp["geojson"], "wb")
        self._geojson = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if gzip_geojson else raw
        self._geojson_raw = raw
        self._geojson.write(b'{"type": "FeatureCollection", "features": [\n')
        self._csv_file = open(self.tmp["csv"], "w", newline="", encoding="utf-8")
        self._csv = csv.writer(self._csv_file, lineterminator="\n")
        self._csv.writerow(CELL_COLUMNS)
        self._schema = pa.schema([("id", pa.int64()), ("x_px", pa.float64()), ("y_px", pa.float64()), ("x_um", pa.float64()),
                                  ("y_um", pa.float64()), ("area_px", pa.int64()), ("area_um2", pa.float64()),
                                  ("class_id", pa.int64()), ("class_name", pa.string()), ("class_prob", pa.float64()),
                                  ("tile", pa.int64()), ("cut", pa.bool_())])
        self._parquet = pq.ParquetWriter(self.tmp["parquet"], self._schema)
        self._rows: list[dict] = []
        self.count = 0
        self.per_class = {name: 0 for name in self.class_names}
        self.cut = 0
        from PIL import Image, ImageDraw

        self._overlay = Image.fromarray(np.ascontiguousarray(thumbnail[..., :3]))
        self._draw = ImageDraw.Draw(self._overlay)
        self._thumb_down = thumbnail_downsample
        self._labels = None
        if labels_shape is not None:
            import zarr

            self.tmp["labels"] = self.folder / ".labels.zarr.tmp"
            self.names["labels"] = "labels.zarr"
            shutil.rmtree(self.tmp["labels"], ignore_errors=True)
            self._labels = zarr.create_array(store=str(self.tmp["labels"]), shape=labels_shape, dtype="uint32",
                                             chunks=(labels_chunk, labels_chunk), fill_value=0,
                                             attributes={"what": "cell instance labels (cells.csv id) at the processing resolution"})

    def class_name(self, class_id: int) -> str:
        return self.class_names[class_id - 1] if 0 < class_id <= len(self.class_names) else str(class_id)

    def add(self, cells: TileCells) -> None:
        """Append one tile's cells, numbered on from the cells written so far."""
        first = self.count + 1
        for i in range(len(cells)):
            cell_id = first + i
            class_id = int(cells.class_id[i])
            name = self.class_name(class_id)
            ring = cells.ring(i)
            area_um2 = float(cells.area_um2[i])
            prob = float(cells.class_prob[i])
            # QuPath reads a feature's id as a UUID: a deterministic one per slide and cell (resumed runs write the same)
            feature = {"type": "Feature", "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"cellgap:{self.slide}:{cell_id}")),
                       "geometry": {"type": "Polygon", "coordinates": [ring]},
                       "properties": {"objectType": "detection", "name": str(cell_id),
                                      "classification": {"name": name, "color": class_colour(class_id)},
                                      "measurements": {"area_um2": area_um2, "class_prob": prob}}}
            prefix = b",\n" if cell_id > 1 else b""
            self._geojson.write(prefix + json.dumps(feature, separators=(",", ":")).encode())
            x, y = float(cells.x[i]), float(cells.y[i])
            row = {"id": cell_id, "x_px": x, "y_px": y, "x_um": round(x * self.level0_mpp, 3),
                   "y_um": round(y * self.level0_mpp, 3), "area_px": int(cells.area_px[i]), "area_um2": area_um2,
                   "class_id": class_id, "class_name": name, "class_prob": prob, "tile": cells.tile,
                   "cut": bool(cells.cut[i])}
            self._csv.writerow([row[c] for c in CELL_COLUMNS])
            self._rows.append(row)
            self.per_class[name] = self.per_class.get(name, 0) + 1
            scaled = [(px / self._thumb_down, py / self._thumb_down) for px, py in ring]
            self._draw.line(scaled, fill=tuple(class_colour(class_id)), width=1)
        self.count += len(cells)
        self.cut += int(cells.cut.sum())
        if len(self._rows) >= PARQUET_ROWS:
            self._flush_parquet()
        if self._labels is not None and cells.labels.size:
            self._write_labels(cells, first)

    def _write_labels(self, cells: TileCells, first: int) -> None:
        x0, y0 = (int(v) for v in cells.labels_origin)
        patch = cells.labels.astype(np.uint32)
        h, w = patch.shape
        height, width = self._labels.shape
        # the kept cells of a tile lie inside the image up to the padding of the last tiles: clip
        r0, c0 = max(0, -y0), max(0, -x0)
        r1, c1 = min(h, height - y0), min(w, width - x0)
        if r1 <= r0 or c1 <= c0:
            return
        patch = patch[r0:r1, c0:c1]
        region = (slice(y0 + r0, y0 + r1), slice(x0 + c0, x0 + c1))
        current = self._labels[region]
        self._labels[region] = np.where(patch > 0, patch + np.uint32(first - 1), current)

    def _flush_parquet(self) -> None:
        import pyarrow as pa

        if self._rows:
            self._parquet.write_table(pa.Table.from_pylist(self._rows, schema=self._schema), row_group_size=PARQUET_ROWS)
            self._rows = []

    def close(self) -> None:
        self._geojson.write(b"\n]}\n")
        self._geojson.close()
        if self._geojson_raw is not self._geojson:
            self._geojson_raw.close()
        self._csv_file.close()
        self._flush_parquet()
        self._parquet.close()
        save_png(self.tmp["overlay"], np.asarray(self._overlay))

    def commit(self) -> dict[str, str]:
        """Rename every temporary file into place; returns {output: file name}."""
        for key, tmp in self.tmp.items():
            final = self.folder / self.names[key]
            if final.is_dir():
                shutil.rmtree(final)
            os.replace(tmp, final)
        return dict(self.names)

    def abort(self) -> None:
        for tmp in self.tmp.values():
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
