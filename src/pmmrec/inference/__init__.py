"""Recommending with a trained model: top-K for a history, new items added without retraining.

See docs/design.md §8.
"""

from pmmrec.inference.catalogue import DuplicateItemsError, ItemInfo
from pmmrec.inference.recommender import (
    CannotAddItemsError,
    NewItem,
    Recommendation,
    Recommender,
    RecommendResult,
    UnknownItemsError,
    UnknownItemWarning,
)

__all__ = ["CannotAddItemsError", "DuplicateItemsError", "ItemInfo", "NewItem", "Recommendation", "RecommendResult", "Recommender", "UnknownItemWarning",
           "UnknownItemsError"]
