"""Losses for learning merging coefficients (MergeRec stage 5).

Scores are cosine similarities; the temperature tau turns them into logits (logits = cosine / tau), exactly as
in local fine-tuning. Note: the MergeRec reference applies its CE term to the raw cosines; here both terms use
cosine / tau (``ce_scaled=False`` gives the reference behaviour).

Top-k teacher (k <= N): the teacher distribution is softmax(t / tau) over its k items only, zero elsewhere; the
student's log-probabilities are log_softmax(s / tau) over all N items, gathered at those k items; the CE
target is the teacher's top-1 item. With k = N this is the dense loss exactly.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.nn import functional as F


def mergerec_loss(student_scores: torch.Tensor, teacher_indices: torch.Tensor, teacher_values: torch.Tensor,
                  tau: float = 0.05, kd_weight: float = 1000.0, *, ce_scaled: bool = True,
                  reduction: Literal["mean", "none"] = "mean") -> torch.Tensor:
    """CE(s / tau, argmax t) + kd_weight * tau^2 * KL(softmax(t / tau) || softmax(s / tau)), per pseudo-user.

    student_scores [B, N] cosines; teacher_indices [B, k] int64 item ids; teacher_values [B, k] cosines.
    Returns the batch mean (a scalar) or, with ``reduction="none"``, the [B] per-pseudo-user losses.
    """
    if student_scores.dim() != 2 or teacher_indices.shape != teacher_values.shape \
            or teacher_indices.shape[0] != student_scores.shape[0]:
        raise ValueError(f"shapes: student {list(student_scores.shape)}, teacher indices "
                         f"{list(teacher_indices.shape)}, values {list(teacher_values.shape)}")
    idx = teacher_indices.to(device=student_scores.device, dtype=torch.long)
    t = teacher_values.to(device=student_scores.device, dtype=student_scores.dtype)
    log_q = F.log_softmax(student_scores / tau, dim=1)  # [B, N], student over all items
    log_q_k = log_q.gather(1, idx)  # [B, k]
    log_p = F.log_softmax(t / tau, dim=1)  # [B, k], teacher over its top-k items
    kl = (log_p.exp() * (log_p - log_q_k)).sum(1)
    target = idx.gather(1, t.argmax(1, keepdim=True))  # [B, 1] teacher's top-1 item id
    if ce_scaled:
        ce = -log_q.gather(1, target).squeeze(1)
    else:
        ce = -F.log_softmax(student_scores, dim=1).gather(1, target).squeeze(1)
    loss = ce + kd_weight * tau * tau * kl
    return loss.mean() if reduction == "mean" else loss


def adamerging_entropy(student_scores: torch.Tensor, tau: float = 0.05, *,
                       reduction: Literal["mean", "none"] = "mean") -> torch.Tensor:
    """Entropy of softmax(s / tau) per row [B, N] -> mean (or [B] with ``reduction="none"``). Needs no teacher."""
    log_q = F.log_softmax(student_scores / tau, dim=1)
    # items left out of the softmax (score -inf) have probability 0 and add 0 (not 0 * -inf = nan)
    ent = -torch.where(log_q.isfinite(), log_q.exp() * log_q, torch.zeros_like(log_q)).sum(1)
    return ent.mean() if reduction == "mean" else ent
