//! Users at work on our objects: slices edited by hand, and a slice held by a foreign finalizer
//! when its Service changes so that the slice must go.

use std::collections::BTreeSet;
use std::time::Instant;

use anyhow::Result;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, Patch, PatchParams, PostParams};
use test_support::apiproxy::ApiProxy;
use test_support::invariants::{OURS, UPSTREAM};
use test_support::{ControlPlane, PodBuilder, create_pod, set_pod_status, wait_for};

use crate::scene::{Scene, WAIT, pod_ip, served, service, slices_of};

const HAND_LABEL: &str = "faults.scm.test/hand-edited";
const FINALIZER: &str = "faults.scm.test/hold";

/// Edits the first slice `managed_by` keeps for `svc` with `f` (a replace carrying the
/// resourceVersion it read, retried when a controller wrote in between).
async fn edit(
    scene: &Scene,
    svc: &str,
    managed_by: &str,
    f: impl Fn(&mut EndpointSlice),
) -> Result<()> {
    let api: Api<EndpointSlice> = Api::namespaced(scene.admin.clone(), &scene.ns);
    wait_for(
        &format!("a hand edit of {svc} ({managed_by})"),
        WAIT,
        || async {
            let mut s = slices_of(&scene.admin, &scene.ns, svc, managed_by)
                .await
                .ok()?
                .into_iter()
                .next()?;
            f(&mut s);
            let name = s.metadata.name.clone()?;
            let written = api.replace(&name, &PostParams::default(), &s).await.ok()?;
            // The API server took the edit as made (so undoing it is the controllers' work).
            let labelled = written
                .metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(HAND_LABEL));
            (labelled && written.endpoints == s.endpoints && written.ports == s.ports).then_some(())
        },
    )
    .await?;
    Ok(())
}

fn add_label(s: &mut EndpointSlice) {
    s.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(HAND_LABEL.into(), "true".into());
}

/// What Service number `i` of `scene` serves with all `pods` ready on `port`.
fn want(scene: &Scene, i: usize, pods: usize, port: i32) -> BTreeSet<(String, i32, bool)> {
    (0..pods)
        .map(|p| (pod_ip(scene.services.len(), i, p), port, true))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_edited_slices_are_restored_as_upstream_restores_them() -> Result<()> {
    let cp = ControlPlane::shared().await?;
    let proxy = ApiProxy::start(cp.client().await?).await?;
    let scene = Scene::start(cp, &proxy, "faults-edit", 2, 3).await?;
    scene.settled("before the hand edits").await?;
    let started = Instant::now();
    let mut edits = 0;
    // The same edits on ours and on upstream's: both controllers must undo them.
    for managed_by in [OURS, UPSTREAM] {
        // svc-0: one endpoint removed and a label added (the slice can be repaired in place).
        edit(&scene, "svc-0", managed_by, |s| {
            if let Some(e) = s.endpoints.as_mut() {
                e.pop();
            }
            add_label(s);
        })
        .await?;
        // svc-1: the port changed and a label added (the slice matches no desired port set).
        edit(&scene, "svc-1", managed_by, |s| {
            for p in s.ports.iter_mut().flatten() {
                p.port = Some(81);
            }
            add_label(s);
        })
        .await?;
        edits += 2;
    }
    wait_for("the hand edits undone on both sides", WAIT, || async {
        for (i, svc) in scene.services.iter().enumerate() {
            for managed_by in [OURS, UPSTREAM] {
                let slices = slices_of(&scene.admin, &scene.ns, svc, managed_by)
                    .await
                    .ok()?;
                let labelled = slices.iter().any(|s| {
                    s.metadata
                        .labels
                        .as_ref()
                        .is_some_and(|l| l.contains_key(HAND_LABEL))
                });
                if labelled || served(&slices) != want(&scene, i, 3, 80) {
                    return None;
                }
            }
        }
        Some(())
    })
    .await?;
    scene
        .finish_for(
            "hand-edited slices (endpoint removed, port changed, label added)",
            edits,
            started,
            &scene.services,
        )
        .await?;
    Ok(())
}

type Served = BTreeSet<(String, i32, bool)>;

/// Waits until the slices of `svc` that are not being deleted serve `want`, ours and upstream's.
async fn both_serve(scene: &Scene, svc: &str, want: &Served, what: &str) -> Result<()> {
    wait_for(what, WAIT, || async {
        for managed_by in [OURS, UPSTREAM] {
            let got = served(
                &slices_of(&scene.admin, &scene.ns, svc, managed_by)
                    .await
                    .ok()?,
            );
            if got != *want {
                return None;
            }
        }
        Some(())
    })
    .await
}

/// The name of the slice `managed_by` keeps for `svc` serving `port`.
async fn slice_serving(scene: &Scene, svc: &str, managed_by: &str, port: i32) -> Result<String> {
    slices_of(&scene.admin, &scene.ns, svc, managed_by)
        .await?
        .into_iter()
        .find(|s| s.ports.iter().flatten().any(|p| p.port == Some(port)))
        .and_then(|s| s.metadata.name)
        .ok_or_else(|| anyhow::anyhow!("no slice of {svc} on {port} ({managed_by})"))
}

async fn set_finalizers(api: &Api<EndpointSlice>, name: &str, hold: bool) -> Result<()> {
    let f = if hold {
        serde_json::json!({"metadata": {"finalizers": [FINALIZER]}})
    } else {
        serde_json::json!({"metadata": {"finalizers": null}})
    };
    api.patch(name, &PatchParams::default(), &Patch::Merge(&f))
        .await?;
    Ok(())
}

/// Whether slice `name` still exists, holds our finalizer, and is being deleted.
async fn state_of(api: &Api<EndpointSlice>, name: &str) -> Result<Option<(bool, bool)>> {
    Ok(api.get_opt(name).await?.map(|s| {
        let held = s
            .metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == FINALIZER);
        (held, s.metadata.deletion_timestamp.is_some())
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slice_held_by_a_finalizer_stays_terminating_without_wedging_its_service() -> Result<()> {
    let cp = ControlPlane::shared().await?;
    let proxy = ApiProxy::start(cp.client().await?).await?;
    let scene = Scene::start(cp, &proxy, "faults-finalizer", 1, 2).await?;
    let (admin, ns) = (scene.admin.clone(), scene.ns.clone());
    let slices: Api<EndpointSlice> = Api::namespaced(admin.clone(), &ns);
    // "named" targets the port named http, which its two pods number differently: one slice
    // per port number, so one can go while the other stays (nothing to create in its place).
    let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);
    let mut named = service(&ns, "named", Some(("app", "named")));
    if let Some(p) = named
        .spec
        .as_mut()
        .and_then(|s| s.ports.as_mut())
        .and_then(|p| p.first_mut())
    {
        p.target_port = Some(IntOrString::String("http".into()));
    }
    svcs.create(&PostParams::default(), &named).await?;
    let pods = [
        ("named-a", 8080, "10.41.7.1"),
        ("named-b", 9090, "10.41.7.2"),
    ];
    for (name, port, ip) in pods {
        let mut pb = PodBuilder::new(&ns, name, &[("app", "named")]);
        pb.node_name = Some(scene.node.clone());
        pb.ports = vec![(Some("http".into()), port, "TCP".into())];
        create_pod(&admin, &pb).await?;
        set_pod_status(&admin, &ns, name, true, &[ip]).await?;
    }
    let mut all: Served = pods
        .iter()
        .map(|(_, port, ip)| (ip.to_string(), *port, true))
        .collect();
    both_serve(&scene, "named", &all, "both sides' slices of named").await?;
    scene.settled("before the finalizers").await?;
    let started = Instant::now();

    // 1. A held slice that must be deleted: named-b leaves the selection, so the 9090 slice has
    // nothing left to serve. The finalizer goes on both sides' slices alike.
    let mut held = Vec::new();
    for managed_by in [OURS, UPSTREAM] {
        let name = slice_serving(&scene, "named", managed_by, 9090).await?;
        set_finalizers(&slices, &name, true).await?;
        held.push(name);
    }
    let pods_api: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(admin.clone(), &ns);
    let away = serde_json::json!({"metadata": {"labels": {"app": "elsewhere"}}});
    pods_api
        .patch("named-b", &PatchParams::default(), &Patch::Merge(&away))
        .await?;
    all.retain(|(_, port, _)| *port == 8080);
    both_serve(&scene, "named", &all, "named served by its other slice").await?;
    // Upstream leaves slices being deleted out of what it reconciles
    // (pkg/controller/endpointslice: dropEndpointSlicesPendingDeletion), and so do we: the
    // held slice is deleted once and stays terminating while the Service is served.
    wait_for("both held slices terminating", WAIT, || async {
        for name in &held {
            if state_of(&slices, name).await.ok()?? != (true, true) {
                return None;
            }
        }
        Some(())
    })
    .await?;
    // Not wedged: a later change of the same Service still shows, on both sides.
    set_pod_status(&admin, &ns, "named-a", false, &["10.41.7.1"]).await?;
    let not_ready: Served = all.iter().map(|(a, p, _)| (a.clone(), *p, false)).collect();
    both_serve(&scene, "named", &not_ready, "named's readiness change").await?;
    for name in &held {
        assert_eq!(
            state_of(&slices, name).await?,
            Some((true, true)),
            "{name} stays, terminating, until its finalizer goes"
        );
        set_finalizers(&slices, name, false).await?;
    }
    wait_for(
        "the held slices gone with their finalizers",
        WAIT,
        || async {
            for name in &held {
                slices.get_opt(name).await.ok()?.is_none().then_some(())?;
            }
            Some(())
        },
    )
    .await?;

    // 2. A held slice that must be replaced: svc-0's port changes. Upstream turns a delete plus
    // a create into an update of the old slice (its finalize step), writing the new slice
    // whole, so the foreign finalizer is dropped; ours must do as upstream does.
    let mut replaced = Vec::new();
    for managed_by in [OURS, UPSTREAM] {
        let name = slice_serving(&scene, "svc-0", managed_by, 80).await?;
        set_finalizers(&slices, &name, true).await?;
        replaced.push(name);
    }
    let port = serde_json::json!({"spec": {"ports": [{"port": 8080}]}});
    svcs.patch("svc-0", &PatchParams::default(), &Patch::Merge(&port))
        .await?;
    let on_8080: Served = (0..2).map(|p| (pod_ip(1, 0, p), 8080, true)).collect();
    both_serve(&scene, "svc-0", &on_8080, "svc-0 served on its new port").await?;
    let ours = state_of(&slices, &replaced[0]).await?;
    let upstream = state_of(&slices, &replaced[1]).await?;
    eprintln!("a held slice replaced: ours {ours:?}, upstream {upstream:?} (held, terminating)");
    assert_eq!(
        ours, upstream,
        "a held slice replaced: ours and upstream differ"
    );
    for name in &replaced {
        if state_of(&slices, name).await?.is_some_and(|(held, _)| held) {
            set_finalizers(&slices, name, false).await?;
        }
    }
    let mut services = scene.services.clone();
    services.push("named".into());
    scene
        .finish_for(
            "slices held by a finalizer: one deleted, one replaced",
            4,
            started,
            &services,
        )
        .await?;
    Ok(())
}
