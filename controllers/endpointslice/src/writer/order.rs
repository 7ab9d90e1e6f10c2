//! Which of a plan's writes traffic waits for, in what order the writer makes them, and where
//! the writer may stop before the plan is done (all judged against the owner's slices the plan
//! was made from).

use std::collections::{HashMap, HashSet};

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use scm_runtime::Priority;

use super::{PodAge, SliceWrites};

/// One call of a plan.
#[derive(Clone, Copy)]
pub(super) enum Op<'a> {
    Create(&'a EndpointSlice),
    Update(&'a EndpointSlice),
    Delete(&'a EndpointSlice),
}

impl Op<'_> {
    fn name(&self) -> Option<&str> {
        match self {
            Op::Create(_) => None,
            Op::Update(s) | Op::Delete(s) => s.metadata.name.as_deref(),
        }
    }
}

fn name(s: &EndpointSlice) -> &str {
    s.metadata.name.as_deref().unwrap_or_default()
}

/// The addresses of a slice's ready endpoints.
fn ready_addresses(s: &EndpointSlice) -> impl Iterator<Item = &str> {
    s.endpoints
        .iter()
        .flatten()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .flat_map(|e| e.addresses.iter().map(String::as_str))
}

/// Ready addresses once `done` is applied to `before`.
fn ready_after<'a>(before: &[&'a EndpointSlice], done: &[Op<'a>]) -> HashSet<&'a str> {
    let touched: HashSet<&str> = done.iter().filter_map(Op::name).collect();
    let written = done.iter().filter_map(|op| match op {
        Op::Create(s) | Op::Update(s) => Some(*s),
        Op::Delete(_) => None,
    });
    before
        .iter()
        .copied()
        .filter(|b| !touched.contains(name(b)))
        .chain(written)
        .flat_map(ready_addresses)
        .collect()
}

/// When the oldest change an update carries happened (seconds since the epoch): the earliest
/// time `age` gives for a pod whose endpoint the update adds, removes or changes.
fn oldest_change(old: Option<&EndpointSlice>, new: &EndpointSlice, age: PodAge<'_>) -> Option<i64> {
    let target = |e: &Endpoint| e.target_ref.as_ref().and_then(|r| r.name.clone());
    let by_target = |s: Option<&EndpointSlice>| -> HashMap<String, Endpoint> {
        s.and_then(|s| s.endpoints.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|e| Some((target(e)?, e.clone())))
            .collect()
    };
    let (olds, news) = (by_target(old), by_target(Some(new)));
    let changed = news
        .iter()
        .filter(|(n, e)| olds.get(*n) != Some(e))
        .map(|(n, _)| n)
        .chain(olds.keys().filter(|n| !news.contains_key(*n)));
    changed.filter_map(|n| age(n)).min()
}

/// The writes of one plan in the order they are started, each with its token-bucket class.
pub(super) struct Ordered<'a> {
    /// The calls, first to last.
    pub ops: Vec<(Priority, Op<'a>)>,
    /// When the oldest change each call carries happened (seconds since the epoch), if known.
    pub ages: Vec<Option<i64>>,
    /// Only the urgent part of a mixed plan is in `ops` (`defer_ordinary`).
    pub deferred: bool,
    // The wave of each call: calls of one wave may be in flight together, a wave starts once
    // the earlier ones are done.
    waves: Vec<Wave>,
    // Ready before the plan and after the whole of it: no stop may leave one of these out.
    keep: HashSet<&'a str>,
    before: Vec<&'a EndpointSlice>,
    known: bool,
}

/// Creates only add; an update that takes away no address the plan keeps ready is safe in any
/// order; one that does (an endpoint moving to another slice) goes alone, after the slices it
/// may move to are written; deletes go last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Wave {
    Create,
    Update,
    Move,
    Delete,
}

impl<'a> Ordered<'a> {
    /// Orders `w`: creates (when `create`), updates, moves, deletes; within a wave urgent
    /// calls first and, within a class, slices not yet written in this pass before those that
    /// were, then updates carrying older changes first (`w.age`), so under a saturated budget
    /// no slice of a large Service waits while others are written again and again.
    ///
    /// Urgent: an update or delete that takes away a ready address no slice keeps ready after
    /// the plan (an endpoint that stopped serving), and the creates of a Service that has no
    /// slice yet. With no known prior state, nothing is urgent.
    pub fn new(w: &SliceWrites<'a>, create: bool) -> Self {
        let before: Vec<&EndpointSlice> = w.before.map(<[_]>::to_vec).unwrap_or_default();
        let full: Vec<Op> = w
            .create
            .iter()
            .map(Op::Create)
            .chain(w.update.iter().map(Op::Update))
            .chain(w.delete.iter().map(Op::Delete))
            .collect();
        let after = ready_after(&before, &full);
        let keep: HashSet<&str> = before
            .iter()
            .flat_map(|b| ready_addresses(b))
            .filter(|a| after.contains(a))
            .collect();
        let known = w.before.is_some();
        let drops_ready = |s: &EndpointSlice| {
            if known && ready_addresses(s).any(|a| !after.contains(a)) {
                Priority::Urgent
            } else {
                Priority::Ordinary
            }
        };
        let create_p = if known && before.is_empty() {
            Priority::Urgent
        } else {
            Priority::Ordinary
        };
        let urgent = |p: &Priority| *p == Priority::Urgent;
        let prior = |u: &EndpointSlice| {
            before
                .iter()
                .copied()
                .find(|b| b.metadata.name == u.metadata.name)
        };
        let mut updates: Vec<(Priority, Op)> = w
            .update
            .iter()
            .map(|u| {
                (
                    prior(u).map_or(Priority::Ordinary, drops_ready),
                    Op::Update(u),
                )
            })
            .collect();
        let mut deletes: Vec<(Priority, Op)> = w
            .delete
            .iter()
            .map(|d| (drops_ready(d), Op::Delete(d)))
            .collect();
        let creates_ordinary = create && !w.create.is_empty() && !urgent(&create_p);
        let mixed = updates.iter().chain(&deletes).any(|(p, _)| urgent(p))
            && (creates_ordinary || !updates.iter().chain(&deletes).all(|(p, _)| urgent(p)));
        // Urgent updates and deletes only take away addresses no slice keeps ready, so making
        // them without the plan's creates cannot make a ready endpoint dip.
        let deferred = w.defer_ordinary && mixed;
        if deferred {
            updates.retain(|(p, _)| urgent(p));
            deletes.retain(|(p, _)| urgent(p));
        }
        let wave = |op: &Op| match op {
            Op::Create(_) => Wave::Create,
            Op::Update(u) => {
                let now: HashSet<&str> = ready_addresses(u).collect();
                let moves = prior(u).is_some_and(|b| {
                    ready_addresses(b).any(|a| keep.contains(a) && !now.contains(a))
                });
                if moves { Wave::Move } else { Wave::Update }
            }
            Op::Delete(_) => Wave::Delete,
        };
        let written_before = |op: &Op| {
            op.name()
                .is_some_and(|n| w.written.is_some_and(|set| set.contains(n)))
        };
        let creates = w
            .create
            .iter()
            .filter(|_| create && !deferred)
            .map(|c| (create_p, Op::Create(c)));
        let ops: Vec<(Wave, Priority, Op)> = creates
            .chain(updates)
            .chain(deletes)
            .map(|(p, op)| (wave(&op), p, op))
            .collect();
        let oldest = |op: &Op| match (op, w.age) {
            (Op::Update(u), Some(age)) => oldest_change(prior(u), u, age),
            (Op::Create(c), Some(age)) => oldest_change(None, c, age),
            (Op::Delete(d), Some(age)) => oldest_change(Some(d), &EndpointSlice::default(), age),
            _ => None,
        };
        let mut ops: Vec<(Wave, Priority, Op, Option<i64>)> = ops
            .into_iter()
            .map(|(wv, p, op)| (wv, p, op, oldest(&op)))
            .collect();
        ops.sort_by_key(|(wv, p, op, age)| {
            (
                *wv,
                std::cmp::Reverse(*p),
                written_before(op),
                age.unwrap_or(i64::MAX),
            )
        });
        Ordered {
            waves: ops.iter().map(|(wv, ..)| *wv).collect(),
            ages: ops.iter().map(|(.., age)| *age).collect(),
            ops: ops.into_iter().map(|(_, p, op, _)| (p, op)).collect(),
            deferred,
            keep,
            before,
            known,
        }
    }

    /// True when stopping with the calls `done` (by index into `ops`) made leaves every
    /// address that is ready before and after the whole plan ready (an endpoint moved between
    /// slices is never missing). Never when the prior state is unknown.
    pub fn can_stop(&self, done: &[bool]) -> bool {
        if !self.known {
            return false;
        }
        let done: Vec<Op> = self
            .ops
            .iter()
            .zip(done)
            .filter(|(_, d)| **d)
            .map(|((_, op), _)| *op)
            .collect();
        let ready = ready_after(&self.before, &done);
        self.keep.iter().all(|a| ready.contains(a))
    }

    /// Whether call `i` may start, with `done` (by index) made and `in_flight` calls under
    /// way: every call of an earlier wave is done, and a move goes alone.
    pub fn may_start(&self, i: usize, done: &[bool], in_flight: usize) -> bool {
        let wave = self.waves[i];
        if wave == Wave::Move {
            return in_flight == 0 && done[..i].iter().all(|d| *d);
        }
        (0..i).all(|j| done[j] || self.waves[j] == wave)
    }
}
