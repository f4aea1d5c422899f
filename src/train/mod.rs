//! Training: optimizer (AdamW, clipping), learning-rate schedule, the causal-LM step.

pub mod lm;
pub mod optimizer;
pub mod schedule;

pub use lm::{LmTrainer, StepStats};
pub use optimizer::{clip_factor, AdamW, AdamwConfig};
pub use schedule::{LrSchedule, ScheduleKind};
