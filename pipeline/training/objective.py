"""Loss plus miner for one batch of embeddings, wired from pytorch-metric-learning."""
from __future__ import annotations

import math

import torch


class Objective:
    """Loss plus miner on one batch of embeddings, wired from pytorch-metric-learning.

    Triplet: TripletMarginLoss on batch-hard (BatchHardMiner), semi-hard (TripletMarginMiner) or
    all triplets. Contrastive: ContrastiveLoss (positives pulled to 0, negatives pushed past the
    margin) on pairs from batch-hard triplets, margin-violating pairs (PairMarginMiner, 'semi-hard')
    or all pairs, with negatives (or positives) subsampled to the positive:negative ratio.
    """

    def __init__(self, loss: str, miner: str, margin: float, pair_ratio: tuple[int, int] = (1, 1)):
        from pytorch_metric_learning import losses, miners

        self.loss_name = loss
        self.pair_ratio = pair_ratio
        if loss == "triplet":
            self.loss = losses.TripletMarginLoss(margin=margin)
            mined = {"semi-hard": lambda: miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard")}
        else:
            self.loss = losses.ContrastiveLoss(pos_margin=0.0, neg_margin=margin)
            mined = {"semi-hard": lambda: miners.PairMarginMiner(pos_margin=0.0, neg_margin=margin)}
        mined["batch-hard"] = miners.BatchHardMiner
        mined["all"] = lambda: None
        self.miner = mined[miner]()

    def indices(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple | None:
        """The mined tuples the loss sees (None: every triplet)."""
        from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

        mined = self.miner(embeddings, labels) if self.miner is not None else None
        if self.loss_name == "triplet":
            return mined
        anchor_pos, positive, anchor_neg, negative = lmu.convert_to_pairs(mined, labels)
        keep_pos, keep_neg = balanced_counts(len(positive), len(negative), self.pair_ratio)
        pos_rows = torch.randperm(len(positive))[:keep_pos]
        neg_rows = torch.randperm(len(negative))[:keep_neg]
        return anchor_pos[pos_rows], positive[pos_rows], anchor_neg[neg_rows], negative[neg_rows]

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(embeddings, labels, self.indices(embeddings, labels))


def balanced_counts(n_pos: int, n_neg: int, ratio: tuple[int, int]) -> tuple[int, int]:
    """How many positive and negative pairs to keep so that neither exceeds the ratio to the other."""
    pos, neg = ratio
    return min(n_pos, math.ceil(n_neg * pos / neg)), min(n_neg, math.ceil(n_pos * neg / pos))
