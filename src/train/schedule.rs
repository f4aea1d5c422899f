//! Learning-rate schedules: linear warmup, then constant, linear or cosine decay to a floor.

use std::str::FromStr;

use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
}

impl FromStr for ScheduleKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(ScheduleKind::Constant),
            "linear" => Ok(ScheduleKind::Linear),
            "cosine" => Ok(ScheduleKind::Cosine),
            _ => Err(Error::invalid(
                "lr_scheduler_type",
                format!("{s:?} is not a schedule; use constant, linear or cosine"),
            )),
        }
    }
}

/// lr(step) for 1-based optimizer steps: `lr * step / warmup` during warmup (so the first
/// step already moves), then `kind` from `lr` down to `min_lr` at `total_steps`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    pub kind: ScheduleKind,
    pub lr: f32,
    pub min_lr: f32,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl LrSchedule {
    pub fn constant(lr: f32) -> Self {
        LrSchedule {
            kind: ScheduleKind::Constant,
            lr,
            min_lr: lr,
            warmup_steps: 0,
            total_steps: 1,
        }
    }

    pub fn lr_at(&self, step: u64) -> f32 {
        let step = step.max(1);
        if step <= self.warmup_steps {
            return self.lr * step as f32 / self.warmup_steps as f32;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let decay = match self.kind {
            ScheduleKind::Constant => return self.lr,
            ScheduleKind::Linear => 1.0 - progress,
            ScheduleKind::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        };
        (self.min_lr as f64 + (self.lr - self.min_lr) as f64 * decay) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_floor() {
        let s = LrSchedule {
            kind: ScheduleKind::Cosine,
            lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 4,
            total_steps: 14,
        };
        assert_eq!(s.lr_at(1), 0.25);
        assert_eq!(s.lr_at(4), 1.0);
        // halfway through the decay: floor + (lr - floor) * 0.5
        assert!((s.lr_at(9) - 0.55).abs() < 1e-6);
        assert!((s.lr_at(14) - 0.1).abs() < 1e-6);
        assert!((s.lr_at(100) - 0.1).abs() < 1e-6);
        // monotone after warmup
        for k in 4..14 {
            assert!(s.lr_at(k + 1) <= s.lr_at(k));
        }
    }

    #[test]
    fn linear_and_constant() {
        let mut s = LrSchedule {
            kind: ScheduleKind::Linear,
            lr: 2.0,
            min_lr: 0.0,
            warmup_steps: 0,
            total_steps: 10,
        };
        assert!((s.lr_at(5) - 1.0).abs() < 1e-6);
        assert!((s.lr_at(10)).abs() < 1e-6);
        s.kind = ScheduleKind::Constant;
        assert_eq!(s.lr_at(7), 2.0);
        assert!("cosine".parse::<ScheduleKind>().is_ok());
        assert!("cosin".parse::<ScheduleKind>().is_err());
    }
}
