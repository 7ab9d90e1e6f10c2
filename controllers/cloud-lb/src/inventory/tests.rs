use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Service, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

use super::*;
use crate::core::{ClassFilter, LB_FINALIZER};

const MIN_AGE: Duration = Duration::from_secs(600);

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000)
}

fn old() -> Option<SystemTime> {
    Some(now() - MIN_AGE - Duration::from_secs(1))
}

fn lb(arn: &str, name: &str, svc: &str, created: Option<SystemTime>) -> TaggedLb {
    TaggedLb {
        arn: arn.into(),
        name: name.into(),
        service: Some(svc.into()),
        created,
        vpc: Some("vpc-1".into()),
        rules: 2,
    }
}

fn tg(arn: &str, name: &str, svc: &str, lbs: &[&str]) -> TaggedTg {
    TaggedTg {
        arn: arn.into(),
        name: name.into(),
        service: Some(svc.into()),
        load_balancers: lbs.iter().map(|s| s.to_string()).collect(),
    }
}

fn ours(names: &[&str]) -> Claim {
    Claim::Ours(names.iter().map(|s| s.to_string()).collect())
}

/// One Service's load balancer `lb-a` (named `a`) with target group `tg-a` (named `a-80`).
fn one_service(created: Option<SystemTime>) -> Inventory {
    Inventory {
        lbs: vec![lb("lb-a", "a", "ns/a", created)],
        tgs: vec![tg("tg-a", "a-80", "ns/a", &["lb-a"])],
        all_lbs: ["lb-a".to_string()].into(),
    }
}

fn summary(out: &[Orphan]) -> Vec<(Kind, &str, Why)> {
    out.iter()
        .map(|o| (o.kind, o.arn.as_str(), o.why))
        .collect()
}

/// What a table row states: its name, the inventory, the Services' claims, the orphans.
type Case = (
    &'static str,
    Inventory,
    BTreeMap<String, Claim>,
    Vec<(Kind, &'static str, Why)>,
);

#[test]
fn orphans_table() {
    use Kind::{LoadBalancer as Lb, TargetGroup as Tg};
    let claim = |c: Option<Claim>| -> BTreeMap<String, Claim> {
        c.map(|c| BTreeMap::from([("ns/a".to_string(), c)]))
            .unwrap_or_default()
    };
    let cases: Vec<Case> = vec![
        (
            "served under its names: nothing",
            one_service(old()),
            claim(Some(ours(&["a", "a-80"]))),
            vec![],
        ),
        (
            "Service gone: the load balancer, then its group",
            one_service(old()),
            claim(None),
            vec![
                (Lb, "lb-a", Why::ServiceGone),
                (Tg, "tg-a", Why::ServiceGone),
            ],
        ),
        (
            "Service no longer a LoadBalancer we serve",
            one_service(old()),
            claim(Some(Claim::Nothing)),
            vec![(Lb, "lb-a", Why::NotServed), (Tg, "tg-a", Why::NotServed)],
        ),
        (
            "another implementation's LoadBalancer Service: never judged",
            one_service(old()),
            claim(Some(Claim::Foreign)),
            vec![],
        ),
        (
            "Service replaced under a new UID: the old load balancer, then its group",
            one_service(old()),
            claim(Some(ours(&["a2", "a2-80"]))),
            vec![(Lb, "lb-a", Why::Replaced), (Tg, "tg-a", Why::Unused)],
        ),
        (
            "young load balancer: neither it nor its Service's groups",
            one_service(Some(now() - Duration::from_secs(5))),
            claim(None),
            vec![],
        ),
        (
            "created in the future (a clock step) counts as young",
            one_service(Some(now() + Duration::from_secs(5))),
            claim(None),
            vec![],
        ),
        (
            "no creation time: judged by the Services alone",
            one_service(None),
            claim(None),
            vec![
                (Lb, "lb-a", Why::ServiceGone),
                (Tg, "tg-a", Why::ServiceGone),
            ],
        ),
        (
            "a leftover group whose load balancer is gone (moto keeps the stale ARN)",
            Inventory {
                lbs: vec![],
                tgs: vec![tg("tg-a", "a-80", "ns/a", &["lb-deleted"])],
                all_lbs: BTreeSet::new(),
            },
            claim(Some(Claim::Nothing)),
            vec![(Tg, "tg-a", Why::NotServed)],
        ),
        (
            "a served Service's group under a name it no longer uses (its node port changed)",
            Inventory {
                lbs: vec![lb("lb-a", "a", "ns/a", old())],
                tgs: vec![
                    tg("tg-a", "a-80", "ns/a", &["lb-a"]),
                    tg("tg-old", "a-old", "ns/a", &[]),
                ],
                all_lbs: ["lb-a".to_string()].into(),
            },
            claim(Some(ours(&["a", "a-80"]))),
            vec![(Tg, "tg-old", Why::Unused)],
        ),
        (
            "a served Service's group it still names, unattached (being created)",
            Inventory {
                lbs: vec![lb("lb-a", "a", "ns/a", old())],
                tgs: vec![tg("tg-new", "a-81", "ns/a", &[])],
                all_lbs: ["lb-a".to_string()].into(),
            },
            claim(Some(ours(&["a", "a-80", "a-81"]))),
            vec![],
        ),
        (
            "a served Service's unused group while its load balancer is young",
            Inventory {
                lbs: vec![lb("lb-a", "a", "ns/a", Some(now()))],
                tgs: vec![tg("tg-old", "a-old", "ns/a", &[])],
                all_lbs: ["lb-a".to_string()].into(),
            },
            claim(Some(ours(&["a", "a-80"]))),
            vec![],
        ),
        (
            "a group still attached to its Service's live load balancer is kept, named or not",
            Inventory {
                lbs: vec![lb("lb-a", "a", "ns/a", old())],
                tgs: vec![tg("tg-old", "a-old", "ns/a", &["lb-a"])],
                all_lbs: ["lb-a".to_string()].into(),
            },
            claim(Some(ours(&["a", "a-80"]))),
            vec![],
        ),
        (
            "a group in use by a live load balancer is never deleted",
            Inventory {
                lbs: vec![],
                tgs: vec![tg("tg-a", "a-80", "ns/a", &["lb-someone-elses"])],
                all_lbs: ["lb-someone-elses".to_string()].into(),
            },
            claim(None),
            vec![],
        ),
        (
            "resources naming no Service are never orphans",
            Inventory {
                lbs: vec![TaggedLb {
                    service: None,
                    ..lb("lb-x", "x", "", old())
                }],
                tgs: vec![TaggedTg {
                    service: None,
                    ..tg("tg-x", "x-80", "", &[])
                }],
                all_lbs: ["lb-x".to_string()].into(),
            },
            BTreeMap::new(),
            vec![],
        ),
    ];
    for (what, inv, claims, want) in cases {
        let got = orphans(&inv, &claims, now(), MIN_AGE);
        assert_eq!(summary(&got), want, "{what}");
    }
}

#[test]
fn load_balancers_come_before_target_groups_and_sorted() {
    let inv = Inventory {
        lbs: vec![
            lb("lb-b", "b", "ns/b", old()),
            lb("lb-a", "a", "ns/a", old()),
        ],
        tgs: vec![
            tg("tg-b", "b-80", "ns/b", &["lb-b"]),
            tg("tg-a", "a-80", "ns/a", &["lb-a"]),
        ],
        all_lbs: ["lb-a".to_string(), "lb-b".to_string()].into(),
    };
    let got: Vec<String> = orphans(&inv, &BTreeMap::new(), now(), MIN_AGE)
        .into_iter()
        .map(|o| o.arn)
        .collect();
    assert_eq!(got, ["lb-a", "lb-b", "tg-a", "tg-b"]);
}

#[test]
fn counts_include_rules_of_orphaned_load_balancers() {
    let found = orphans(&one_service(old()), &BTreeMap::new(), now(), MIN_AGE);
    let c = counts(&found);
    assert_eq!(c[&Kind::LoadBalancer], 1);
    assert_eq!(c[&Kind::TargetGroup], 1);
    assert_eq!(c[&Kind::SecurityGroupRule], 2);
    let none = counts(&[]);
    assert_eq!(none.len(), 3, "every kind present");
    assert!(none.values().all(|n| *n == 0));
}

fn service(name: &str, type_: &str, class: Option<&str>) -> Service {
    Service {
        metadata: ObjectMeta {
            namespace: Some("ns".into()),
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some(type_.into()),
            load_balancer_class: class.map(str::to_string),
            ..Default::default()
        }),
        status: None,
    }
}

#[test]
fn claims_follow_the_controllers_notion_of_ours() {
    let filter = ClassFilter {
        class: Some("ours".into()),
        default_implementation: false,
    };
    let mut cleaning = service("cleaning", "ClusterIP", Some("ours"));
    cleaning.metadata.finalizers = Some(vec![LB_FINALIZER.into()]);
    let mut deleting = service("deleting", "LoadBalancer", Some("ours"));
    deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
    deleting.metadata.finalizers = Some(vec!["someone.else/finalizer".into()]);
    let svcs = [
        service("served", "LoadBalancer", Some("ours")),
        cleaning,
        service("classless", "LoadBalancer", None),
        service("theirs", "LoadBalancer", Some("theirs")),
        service("plain", "ClusterIP", None),
        deleting,
    ];
    let got = claims(svcs.iter(), &filter, |s| {
        [format!(
            "name-of-{}",
            s.metadata.name.as_deref().unwrap_or("")
        )]
        .into()
    });
    let want: BTreeMap<String, Claim> = [
        ("ns/served", ours(&["name-of-served"])),
        ("ns/cleaning", ours(&["name-of-cleaning"])),
        ("ns/classless", Claim::Foreign),
        ("ns/theirs", Claim::Foreign),
        ("ns/plain", Claim::Nothing),
        ("ns/deleting", Claim::Nothing),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(got, want);
}

#[test]
fn orphan_modes_parse() {
    assert_eq!("report".parse::<OrphanMode>(), Ok(OrphanMode::Report));
    assert_eq!("delete".parse::<OrphanMode>(), Ok(OrphanMode::Delete));
    assert!("purge".parse::<OrphanMode>().is_err());
    assert_eq!(OrphanMode::default(), OrphanMode::Report);
}
