"""Model merging for MergeRec: task vectors, training-free merges, pseudo-users, teacher targets, losses and
learned coefficients (docs/design.md, "Merge contracts"; ../shared/docs/method.md, stages 2-5)."""

from common.merging.coefficients import (
    DEFAULT_INIT,
    CoefficientConfig,
    CoefficientMerger,
    CoefficientResult,
    DomainBatchSource,
    batch_loss,
    initial_value,
    learn_coefficients,
    merge_with_coefficients,
)
from common.merging.losses import adamerging_entropy, mergerec_loss
from common.merging.methods import MergeConfig, MergePlan, config_for, merge, method_names, process, register
from common.merging.pseudo_users import kmeans, select_pseudo_users
from common.merging.task_vectors import (
    BaseMismatchError,
    add_vector,
    apply,
    check_compatible,
    fingerprint,
    task_vector,
)
from common.merging.teacher import TopKLogits, teacher_topk

__all__ = [
    "DEFAULT_INIT", "BaseMismatchError", "CoefficientConfig", "CoefficientMerger", "CoefficientResult",
    "DomainBatchSource", "MergeConfig", "MergePlan", "TopKLogits", "adamerging_entropy",
    "add_vector", "apply", "batch_loss", "check_compatible", "config_for", "fingerprint", "initial_value", "kmeans",
    "learn_coefficients", "merge", "merge_with_coefficients", "mergerec_loss", "method_names", "process",
    "register", "select_pseudo_users", "task_vector", "teacher_topk",
]
