//! Training: optimizer, LR schedule, gradient clipping.
