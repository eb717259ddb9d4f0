"""Whole-slide inference: read a slide lazily, find its tissue, stream tiles through the network and the
post-processing, keep every cell once (the seam rule in :mod:`cellgap.slide.tiling`) and write QuPath GeoJSON,
cell tables, labels, an overlay and a summary (docs/slides.md)."""
