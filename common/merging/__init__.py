"""Model merging as pure tensor math (no model is built or run here): task vectors, training-free merges,
pseudo-user selection, teacher top-k targets and the distillation losses (docs/design.md, "Merge contracts";
../shared/docs/method.md, stages 2-5). Learning coefficients needs the model's forward pass: that lives in
common/model/coefficients.py."""
