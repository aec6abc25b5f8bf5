"""Training objectives of PMMRec (ICDE 2024; docs/design.md §5), kept outside the model (house rule 4).

Every loss is a plain function of tensors: the model produces user states and item vectors, the loss knows
nothing about ranks, devices or configuration. ``next_item`` holds L_rec, the reference code's next-item loss;
``nicl``, ``nid`` and ``rcl`` the auxiliary losses, ``corruption`` the noise that L_NID and L_RCL share, and
``heads`` the small modules (owned and saved by the model) that those losses need. Each file also defines its
:class:`~pmmrec.objectives.base.Objective` (term + heads), listed in :mod:`pmmrec.objectives.registry`.
"""

from pmmrec.objectives.base import Objective, StepOutputs
from pmmrec.objectives.corruption import corrupt
from pmmrec.objectives.heads import ContrastiveHead, NoiseClassifier
from pmmrec.objectives.next_item import (
    log_popularity,
    next_item_loss,
    sample_negative_items,
    sampled_next_item_loss,
    window_item_mask,
)
from pmmrec.objectives.nicl import nicl_loss
from pmmrec.objectives.nid import nid_loss
from pmmrec.objectives.rcl import rcl_loss
from pmmrec.objectives.registry import OBJECTIVES, build_heads, in_use, register

__all__ = ["OBJECTIVES", "Objective", "StepOutputs", "build_heads", "in_use", "register", "log_popularity",
           "next_item_loss", "sample_negative_items", "sampled_next_item_loss", "window_item_mask", "corrupt",
           "ContrastiveHead", "NoiseClassifier", "nicl_loss", "nid_loss", "rcl_loss"]
