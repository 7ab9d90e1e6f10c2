//! A finding for the shell's unit tests: every field of [`Report`] the tests vary.

use std::time::{Duration, SystemTime};

use crate::mirror::Report;

/// A finding with the given reason, message, settle time and grace.
#[derive(Clone)]
pub(super) struct F {
    pub reason: &'static str,
    pub msg: &'static str,
    pub settle: Duration,
    pub not_before: Option<SystemTime>,
}

impl F {
    /// A finding with `reason` and `msg` that waits `settle` before it is reported.
    pub fn new(reason: &'static str, msg: &'static str, settle: Duration) -> Self {
        F {
            reason,
            msg,
            settle,
            not_before: None,
        }
    }
}

impl Report for F {
    fn reason(&self) -> &'static str {
        self.reason
    }
    fn action(&self) -> &'static str {
        "A"
    }
    fn message(&self) -> String {
        self.msg.into()
    }
    fn metric_type(&self) -> &'static str {
        "t"
    }
    fn not_before(&self) -> Option<SystemTime> {
        self.not_before
    }
    fn settle(&self) -> Duration {
        self.settle
    }
}

/// `s` seconds into a test's clock.
pub(super) fn t(s: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_000 + s)
}
