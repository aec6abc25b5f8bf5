"""Full-ranking evaluation of PMMRec (ICDE 2024; docs/design.md §7): ranks, then HR/NDCG/MRR@K.

``ranking`` turns user and item vectors into the rank of each held-out item under the ``exclude_history`` and
``include_history`` protocols (and a running top-K for recommending); ``metrics`` turns ranks into metrics.
"""

from pmmrec.evaluation.metrics import (
    COUNT_KEY,
    METRIC_NAMES,
    mean_metrics,
    metric_sums,
    metrics_from_ranks,
    per_user_metrics,
)
from pmmrec.evaluation.ranking import (
    EXCLUDE_HISTORY,
    INCLUDE_HISTORY,
    PROTOCOLS,
    evaluate_rankings,
    full_rank,
    pad_histories,
    rank_targets,
    topk_items,
)

__all__ = ["COUNT_KEY", "EXCLUDE_HISTORY", "INCLUDE_HISTORY", "METRIC_NAMES", "PROTOCOLS", "evaluate_rankings",
           "full_rank", "mean_metrics", "metric_sums", "metrics_from_ranks", "pad_histories", "per_user_metrics",
           "rank_targets", "topk_items"]
