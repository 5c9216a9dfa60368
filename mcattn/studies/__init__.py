"""The evaluation wing: mcattn's methods measured on real attention and real models.

What lives here and not in a method folder: the comparison of every method on the
embedded MiniLM sample (:mod:`.compare`, the main job of ``mcattn compare``, with one
:class:`~mcattn.studies.entries.MethodEntry` per method in ``studies/<method>/compare.py``), the
evaluation inside the model on real tasks (:mod:`.evaluate`), the energy report
(:mod:`.energy`), the distillation (:mod:`.finetune`), the embedded sample and its capture
(:mod:`.data`), and the per-method studies that regenerate the tables of ``docs/<method>.md``
(``studies/rfa/evaluate.py``, ``studies/latte/evaluate.py``, ``studies/mca/report.py``,
``studies/eigen/``: evaluate, heldout, the NumPy BERT, the real-data capture and the torch
adapter's calibration).

The method folders (``mcattn/exact``, ``mca``, ``rfa``, ``eatt``, ``latte``, ``eigen``) keep
kernels, references, bounds, operation counts and gradients only, and nothing in them
imports this package (tests/test_style.py checks it); studies import the methods through
their public names. The old paths of these modules still import, with a
``DeprecationWarning`` (:mod:`mcattn._moved`).
"""
