"""The study: encoders × dataset × splits, each run of the grid (one encoder on one split) trained, tuned on val,
tested, summarised.

One call (or ``cellgap study`` / ``python -m cellgap.study`` / ``scripts/run_study.py``) runs the whole grid and
writes a results folder; ``--list`` / ``--only`` run it one run per job (Slurm, GNU parallel), ``torchrun -m
cellgap.study`` one rank per GPU, ``--results-only`` merges what has finished.  Layout of ``study_dir``::

    study.json                                   the grid (encoders, dataset, splits, overrides, test settings)
    cells/<dataset>/<split>/<encoder>/cell.json  status, chosen minimum cell size, candidate scores, timings, protocol
                                     models/     decoder checkpoint (its meta carries the chosen minimum cell size)
                                     runs/       TensorBoard run of the training (+ the val selection scalars)
                                     select_val/ per-candidate reports on the validation split
                                     eval_test/  test reports of the bundle's evaluate config (per image/class/tissue)
    results/                                     tables, gap statistics, figures, protocol.json, README.md

Splits are protocol names of the prepared dataset (PanNuke ``official1 official2 official3``, ``cisca`` …);
for the synthetic dataset they are data seeds (``seed0``, ``seed1`` …, or plain integers), each a freshly
generated dataset.

Modules: ``plan`` (the grid), ``cells`` (a run on disk; the name predates "run"), ``grid`` (the runs, their
states, ``--only``, the options check), ``bundles`` (running a bundle config), ``selection`` (minimum cell size on
val), ``runner`` (the grid, resumable, torchrun ranks), ``results`` (the results folder), ``tables``, ``gap``,
``cost``, ``figures`` (its parts), ``estimate`` (``--dry-run``), ``provenance`` (versions, timestamps), ``cli``.
"""

from .cli import add_study_arguments, run_study_from_args
from .gap import pooled_paired_statistics
from .plan import SplitSpec, StudyPlan, resolve_splits
from .results import write_results
from .runner import StudyReport, make_plan, run_study
from .selection import CandidateOutput

__all__ = ["CandidateOutput", "SplitSpec", "StudyPlan", "StudyReport", "add_study_arguments",
           "make_plan", "pooled_paired_statistics", "resolve_splits", "run_study", "run_study_from_args", "write_results"]
