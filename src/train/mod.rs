//! Training: optimizer (AdamW, clipping), learning-rate schedule, the causal-LM step.

pub mod checkpoint;
pub mod lm;
pub mod metrics;
pub mod nla;
pub mod optimizer;
pub mod progress;
pub mod run;
pub mod schedule;
pub mod setup;

pub use lm::{LmTrainer, StepStats};
pub use optimizer::{clip_factor, AdamW, AdamwConfig};
pub use schedule::{LrSchedule, ScheduleKind};
