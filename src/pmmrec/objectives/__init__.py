"""Training objectives of PMMRec (ICDE 2024; DESIGN.md section 5), kept outside the model (STYLE.md rule 4).

Every loss is a plain function of tensors: the model produces user states and item vectors, the loss knows
nothing about ranks, devices or configuration. ``next_item`` holds L_rec, the reference code's next-item loss.
"""

from pmmrec.objectives.next_item import (
    log_popularity,
    next_item_loss,
    sample_negative_items,
    sampled_next_item_loss,
    window_item_mask,
)

__all__ = ["log_popularity", "next_item_loss", "sample_negative_items", "sampled_next_item_loss",
           "window_item_mask"]
