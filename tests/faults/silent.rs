//! A half-open watch: the proxy answers the pods watch and then sends nothing, as a connection
//! whose peer vanished would. Readiness changes made meanwhile must still show, once the
//! client gives up on the silent stream (kube-runtime's watcher bounds an idle watch by the
//! server-side timeout, 290 s by default, plus 5 s) and watches again.

use std::time::{Duration, Instant};

use anyhow::Result;
use test_support::apiproxy::{Action, ApiProxy, Match};
use test_support::invariants::{OURS, UPSTREAM};
use test_support::{ControlPlane, wait_for};

use crate::scene::{Scene, WAIT, check, served, slices_of};

/// How long a readiness change may take to show through a silent watch: beyond this, a
/// half-open connection would be a defect (nothing would end it).
const SILENT_BOUND: Duration = Duration::from_secs(360);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run by make chaos"]
async fn readiness_changes_show_after_a_silent_half_open_pods_watch() -> Result<()> {
    let cp = ControlPlane::shared().await?;
    let proxy = ApiProxy::start(cp.client().await?).await?;
    let scene = Scene::start(cp, &proxy, "faults-silent", 1, 2).await?;
    scene.settled("before the silent watch").await?;
    let before = proxy.injected();
    proxy.fail(Match::watches("pods"), Action::Silent, 1);
    proxy.end_watches("pods");
    wait_for("the pods watch to go silent", WAIT, || async {
        (proxy.injected() > before).then_some(())
    })
    .await?;
    scene.set_ready(2, false).await?;
    let changed = Instant::now();
    let (admin, ns) = (&scene.admin, &scene.ns);
    let not_ready = wait_for("upstream to show the change", WAIT, || async {
        let up = served(&slices_of(admin, ns, "svc-0", UPSTREAM).await.ok()?);
        (up.len() == 2 && up.iter().all(|(_, _, ready)| !ready)).then_some(up)
    })
    .await?;
    wait_for("our slices to show the change", SILENT_BOUND, || async {
        let ours = served(&slices_of(admin, ns, "svc-0", OURS).await.ok()?);
        (ours == not_ready).then_some(())
    })
    .await?;
    let shown = changed.elapsed();
    eprintln!("silent pods watch: the readiness change showed after {shown:?}");
    check(
        admin,
        ns,
        &scene.services,
        "pods watch silent (half-open), readiness changed meanwhile; converged = time to show",
        proxy.injected(),
        changed,
        0,
    )
    .await?;
    Ok(())
}
