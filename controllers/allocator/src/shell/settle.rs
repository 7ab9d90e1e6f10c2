//! When a standing finding falls due: some must stand a while before they are reported
//! ([`Report::settle`]: they compare two watches that can be a moment apart), some wait out
//! upstream's grace period ([`Report::not_before`]). The shell notes when each was first seen
//! at every rebuild and asks [`FirstSeen::due`] before reporting.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use scm_runtime::ObjectKey;

use crate::mirror::Report;

/// A finding's identity: its holder, reason and message.
type Id = (ObjectKey, &'static str, String);

/// When each waiting finding was first seen (findings that never wait are not kept).
#[derive(Default)]
pub struct FirstSeen {
    at: Mutex<HashMap<Id, SystemTime>>,
}

/// The time a finding first seen at `seen` is due: once it has stood `settle`, and not
/// before `not_before`.
pub fn due_at(seen: SystemTime, settle: Duration, not_before: Option<SystemTime>) -> SystemTime {
    let settled = seen + settle;
    not_before.map_or(settled, |t| t.max(settled))
}

impl FirstSeen {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Id, SystemTime>> {
        self.at.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `findings` as standing at `now`: new ones are first seen now, those still there
    /// keep their time, and those gone are forgotten (a recurrence starts over).
    pub fn note<F: Report>(&self, findings: &BTreeMap<ObjectKey, Vec<F>>, now: SystemTime) {
        let mut at = self.lock();
        let mut kept = HashMap::new();
        for (k, fs) in findings {
            for f in fs {
                if f.settle().is_zero() && f.not_before().is_none() {
                    continue;
                }
                let id = (k.clone(), f.reason(), f.message());
                let t = at.get(&id).copied().unwrap_or(now);
                kept.insert(id, t);
            }
        }
        *at = kept;
    }

    /// When `f` about `key` is due (a finding never noted counts as seen long ago).
    pub fn due<F: Report>(&self, key: &ObjectKey, f: &F) -> SystemTime {
        let seen = self
            .lock()
            .get(&(key.clone(), f.reason(), f.message()))
            .copied()
            .unwrap_or(SystemTime::UNIX_EPOCH);
        due_at(seen, f.settle(), f.not_before())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::test_finding::{F, t};

    #[test]
    fn due_once_settled_and_not_before_the_grace_ends() {
        let s = Duration::from_secs(1);
        assert_eq!(due_at(t(0), s, None), t(1));
        assert_eq!(due_at(t(0), s, Some(t(60))), t(60));
        assert_eq!(due_at(t(100), s, Some(t(60))), t(101));
        assert_eq!(due_at(t(0), Duration::ZERO, None), t(0));
    }

    #[test]
    fn first_seen_survives_rebuilds_and_a_recurrence_starts_over() {
        let seen = FirstSeen::default();
        let key = ObjectKey::new("a", "s");
        let f = F::new("R", "m", Duration::from_secs(1));
        let standing = BTreeMap::from([(key.clone(), vec![f.clone()])]);
        seen.note(&standing, t(0));
        seen.note(&standing, t(5));
        assert_eq!(seen.due(&key, &f), t(1), "kept its first time");
        seen.note(&BTreeMap::<ObjectKey, Vec<F>>::new(), t(6));
        seen.note(&standing, t(7));
        assert_eq!(seen.due(&key, &f), t(8), "gone, then back: starts over");
        // A finding that never waits is not kept, and is due at once.
        let quick = F::new("R", "q", Duration::ZERO);
        seen.note(&BTreeMap::from([(key.clone(), vec![quick.clone()])]), t(9));
        assert_eq!(seen.due(&key, &quick), SystemTime::UNIX_EPOCH);
    }
}
