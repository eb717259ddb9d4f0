"""Test helpers shipped with the library, for its tests, benchmarks and bundle smoke runs; nothing in cellgap's
own pipeline imports them.

* :mod:`cellgap.testing.fixtures` — tiny datasets written in each dataset's native format (PanNuke, CoNIC,
  CytoDArk0, a user folder) for the real converters, and crowded instance maps / stained images.
* :mod:`cellgap.testing.errors` — the messages of an exception chain (MONAI wraps config errors).
* :mod:`cellgap.testing.synthetic_pairs` — synthetic ground-truth / prediction label-map pairs with the defects
  the metrics must handle (shifted boundaries, missed, split and merged cells, fragments, odd ids).
"""
