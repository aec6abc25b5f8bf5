"""Training: the public entry points (:func:`train`, :func:`pretrain`, :func:`transfer`), the loop
(:mod:`~pmmrec.training.trainer`), the objective module, optimiser, run folders and transfer by part."""

from pmmrec.training.api import fit, pretrain, train, transfer

__all__ = ["fit", "pretrain", "train", "transfer"]
