"""Runtime plumbing below every model and data layer: torchrun process groups and collectives
(:mod:`~pmmrec.runtime.distributed`), checkpoint files (:mod:`~pmmrec.runtime.checkpoint`), device and seeds
(:mod:`~pmmrec.runtime.device`) and the on-disk feature cache (:mod:`~pmmrec.runtime.feature_files`).

Nothing here knows about PMMRec's model, data or objectives (docs/design.md §12).
"""
