"""GRU4Rec user encoder (Hidasi et al., ICLR 2016; Tan et al., DLRS 2016), an alternative user encoder (§IV).

Dropout on the input item vectors, one GRU layer of width D, then a linear map to D. The GRU has no biases, as
in the reference code, and padded inputs are zeroed: a bias-free GRU that starts from a zero state and reads
zero inputs stays exactly at zero, so left padding of any length leaves the real positions' states unchanged,
with no need to pack sequences.
"""

from __future__ import annotations

from torch import Tensor, nn

from pmmrec.config import ModelConfig


class GRU4Rec(nn.Module):
    """``forward(item_embs (B, L, D), mask (B, L)) -> (B, L, D)``; position l sees items 0..l only."""

    def __init__(self, dim: int, dropout: float = 0.1):
        super().__init__()
        self.input_dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(dim, dim, num_layers=1, bias=False, batch_first=True)
        self.out = nn.Linear(dim, dim)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.GRU):  # the reference's choice for its GRU
            for weight in module.parameters():
                nn.init.xavier_uniform_(weight)
        elif isinstance(module, nn.Linear):
            nn.init.xavier_normal_(module.weight)
            nn.init.zeros_(module.bias)

    @classmethod
    def from_config(cls, cfg: ModelConfig, max_seq_len: int) -> GRU4Rec:
        return cls(cfg.dim, cfg.dropout)  # a recurrent net needs no max_seq_len

    def forward(self, item_embs: Tensor, mask: Tensor) -> Tensor:
        keep = (mask != 0).unsqueeze(-1)  # (B, L, 1)
        x = self.input_dropout(item_embs.masked_fill(~keep, 0.0))  # (B, L, D)
        states, _ = self.gru(x)  # (B, L, D); the final hidden state is not needed
        return self.out(states).masked_fill(~keep, 0.0)  # (B, L, D)
