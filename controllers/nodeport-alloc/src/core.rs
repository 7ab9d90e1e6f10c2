//! The pure NodePort core: the port range and all Services in, the mirrored allocation state,
//! repair findings and per-Service assign plans out. No I/O here.

use std::collections::{BTreeSet, HashMap};

use k8s_openapi::api::core::v1::Service;
use rand::Rng;
use scm_allocator::shell::seniority;
pub use scm_allocator::shell::service_type;
use scm_allocator::{Pending, PortRange, PortSpan, Report};
use scm_runtime::ObjectKey;

/// A problem upstream's NodePort repair loop reports, as an Event on the Service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Finding {
    /// Held by an older Service (or twice by this one on the same protocol).
    Duplicate {
        /// The port.
        port: i32,
    },
    /// Outside the configured range.
    OutOfRange {
        /// The port.
        port: i32,
        /// The range.
        range: String,
    },
    /// No port left for a Service that needs one.
    Full {
        /// The range.
        range: String,
    },
}

impl Report for Finding {
    fn reason(&self) -> &'static str {
        match self {
            Finding::Duplicate { .. } => "PortAlreadyAllocated",
            Finding::OutOfRange { .. } => "PortOutOfRange",
            Finding::Full { .. } => "PortRangeFull",
        }
    }

    fn action(&self) -> &'static str {
        "PortAllocation"
    }

    /// The `type` label of `apiserver_nodeport_repair_port_errors_total`.
    fn metric_type(&self) -> &'static str {
        match self {
            Finding::Duplicate { .. } => "duplicate",
            Finding::OutOfRange { .. } => "outOfRange",
            Finding::Full { .. } => "full",
        }
    }

    /// Worded as upstream's repair loop.
    fn message(&self) -> String {
        match self {
            Finding::Duplicate { port } => {
                format!("Port {port} was assigned to multiple services; please recreate service")
            }
            Finding::OutOfRange { port, range } => {
                format!("Port {port} is not within the port range {range}; please recreate service")
            }
            Finding::Full { range } => format!(
                "Port range {range} is full; you must widen the port range in order to create new services"
            ),
        }
    }
}

fn uses_node_ports(svc: &Service) -> bool {
    matches!(service_type(svc), "NodePort" | "LoadBalancer")
}

/// Whether new node ports are allocated for ports without one (`shouldAllocateNodePorts`).
fn should_allocate(svc: &Service) -> bool {
    match service_type(svc) {
        "NodePort" => true,
        // Defaulted to true by the API server.
        "LoadBalancer" => svc
            .spec
            .as_ref()
            .and_then(|s| s.allocate_load_balancer_node_ports)
            .unwrap_or(true),
        _ => false,
    }
}

fn wants_health_check(svc: &Service) -> bool {
    service_type(svc) == "LoadBalancer"
        && svc
            .spec
            .as_ref()
            .and_then(|s| s.external_traffic_policy.as_deref())
            == Some("Local")
}

/// The node ports a Service holds, as upstream's repair collects them: one entry per nodePort,
/// except that the same port on another protocol shares its entry (listed again on the same
/// protocol, so that the repeat shows as a duplicate); plus the health-check port.
pub fn collect_node_ports(svc: &Service) -> Vec<i32> {
    let Some(spec) = svc.spec.as_ref() else {
        return vec![];
    };
    let mut out = Vec::new();
    let mut seen: HashMap<i32, BTreeSet<String>> = HashMap::new();
    for p in spec.ports.iter().flatten() {
        let np = p.node_port.unwrap_or(0);
        if np == 0 {
            continue;
        }
        let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
        let s = seen.entry(np).or_default();
        if s.is_empty() || s.contains(&proto) {
            out.push(np);
        }
        s.insert(proto);
    }
    let hc = spec.health_check_node_port.unwrap_or(0);
    if hc != 0 && seen.get(&hc).is_none_or(|s| s.contains("TCP")) {
        out.push(hc);
    }
    out
}

/// Whether a Service lacks node ports it needs, or carries ports its type must not have.
/// Services a stock kube-apiserver stored never do.
pub fn needs_assignment(svc: &Service) -> bool {
    let Some(spec) = svc.spec.as_ref() else {
        return false;
    };
    if !uses_node_ports(svc) {
        return spec
            .ports
            .iter()
            .flatten()
            .any(|p| p.node_port.unwrap_or(0) != 0)
            || spec.health_check_node_port.unwrap_or(0) != 0;
    }
    let missing = should_allocate(svc)
        && spec
            .ports
            .iter()
            .flatten()
            .any(|p| p.node_port.unwrap_or(0) == 0);
    missing || (wants_health_check(svc) && spec.health_check_node_port.unwrap_or(0) == 0)
}

/// The node-port allocation state mirrored from all Services: the ledger over the port range.
pub type Mirror = scm_allocator::Mirror<PortRange, ObjectKey, Finding>;

/// Builds the state from all Services; contested ports go to the oldest Service (then by key),
/// so a restart rebuilds the same owners. `pending` are written but unobserved assignments,
/// claimed first.
pub fn build(span: PortSpan, services: &[&Service], pending: &Pending<ObjectKey, i32>) -> Mirror {
    Mirror::build(
        PortRange::new(span),
        services,
        pending,
        seniority,
        |m, key, svc| {
            if uses_node_ports(svc) {
                let mut mine = BTreeSet::new();
                for port in collect_node_ports(svc) {
                    if let Some(f) = observe(m, port, key, &mut mine) {
                        m.report(key, f);
                    }
                }
            }
            if needs_assignment(svc) {
                m.needs_assign.insert(key.clone());
            }
        },
    )
}

fn observe(
    m: &mut Mirror,
    port: i32,
    key: &ObjectKey,
    mine: &mut BTreeSet<i32>,
) -> Option<Finding> {
    let span = m.pool.span();
    if !span.contains(port as i64) {
        return Some(Finding::OutOfRange {
            port,
            range: span.to_string(),
        });
    }
    match m.holder(&port) {
        Some(holder) if holder != key => Some(Finding::Duplicate { port }),
        Some(_) if !mine.insert(port) => Some(Finding::Duplicate { port }),
        Some(_) => None,
        None => {
            mine.insert(port);
            m.claim(port, key);
            None
        }
    }
}

/// (allocated, available) for the capacity gauges.
pub fn capacity(m: &Mirror) -> (usize, usize) {
    (m.pool.used(), m.pool.free())
}

/// What to write to a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Nothing to do.
    Nothing,
    /// Set `spec.ports[i].nodePort` for every index (0: leave unset) and the health-check port.
    Assign {
        /// nodePort per `spec.ports` index.
        node_ports: Vec<i32>,
        /// `spec.healthCheckNodePort`, when the Service needs one.
        health_check_node_port: Option<i32>,
    },
    /// A ClusterIP or ExternalName Service still carrying node ports: drop them (upstream's
    /// strategy on a type change; the ports are already released in the mirror).
    Clear,
    /// The range is full.
    Full(Finding),
    /// A requested port cannot be had; worded as kube-apiserver's refusal of the write.
    Reject(String),
}

/// Decides node ports for a Service as kube-apiserver's `initNodePorts` and
/// `allocHealthCheckNodePort` would, allocating in `mirror`.
pub fn plan<R: Rng + ?Sized>(mirror: &mut Mirror, svc: &Service, rng: &mut R) -> Plan {
    if !needs_assignment(svc) {
        return Plan::Nothing;
    }
    let Some(spec) = svc.spec.as_ref() else {
        return Plan::Nothing;
    };
    if !uses_node_ports(svc) {
        return Plan::Clear;
    }
    let key = ObjectKey::of(svc);
    let existing: BTreeSet<i32> = collect_node_ports(svc).into_iter().collect();
    // Ports held for this Service but not on it yet (an earlier write not yet observed).
    let mut held: Vec<i32> = mirror
        .owners
        .iter()
        .filter(|(p, k)| **k == key && !existing.contains(p))
        .map(|(p, _)| *p)
        .collect();
    held.sort_unstable_by(|a, b| b.cmp(a));
    let mut fresh = Vec::new();
    let mut next = |mirror: &mut Mirror, fresh: &mut Vec<i32>| -> Result<i32, Finding> {
        if let Some(p) = held.pop() {
            return Ok(p);
        }
        let span = mirror.pool.span();
        let p = mirror
            .take(&key, |r| r.allocate_next(rng).map(i32::from))
            .map_err(|_| Finding::Full {
                range: span.to_string(),
            })?;
        fresh.push(p);
        Ok(p)
    };
    let ports = spec.ports.clone().unwrap_or_default();
    let name = svc.metadata.name.clone().unwrap_or_default();
    let refusal = |port: i32, holder: Option<&ObjectKey>, mirror: &Mirror| -> Option<String> {
        if !mirror.pool.span().contains(port as i64) {
            return Some(scm_allocator::PortError::NotInRange(mirror.pool.span()).to_string());
        }
        match holder {
            Some(h) if *h != key => Some(scm_allocator::PortError::Allocated.to_string()),
            _ => None,
        }
    };
    for (i, p) in ports.iter().enumerate() {
        let np = p.node_port.unwrap_or(0);
        if np == 0 {
            continue;
        }
        if let Some(why) = refusal(np, mirror.owners.get(&np), mirror) {
            return Plan::Reject(format!(
                "Service \"{name}\" is invalid: spec.ports[{i}].nodePort: Invalid value: {np}: {why}"
            ));
        }
    }
    let hc_req = spec.health_check_node_port.unwrap_or(0);
    if hc_req != 0
        && wants_health_check(svc)
        && let Some(why) = refusal(hc_req, mirror.owners.get(&hc_req), mirror)
    {
        return Plan::Reject(format!(
            "Internal error occurred: failed to allocate requested HealthCheck NodePort {hc_req}: {why}"
        ));
    }
    let mut node_ports: Vec<i32> = ports.iter().map(|p| p.node_port.unwrap_or(0)).collect();
    let allocate = should_allocate(svc);
    let mut by_port: HashMap<i32, i32> = HashMap::new();
    let mut result = Ok(());
    for (i, p) in ports.iter().enumerate() {
        if node_ports[i] == 0 && !allocate {
            continue;
        }
        match by_port.get(&p.port) {
            None => {
                // A value requested on a later entry with the same port number is shared.
                let requested = ports[i..]
                    .iter()
                    .zip(&node_ports[i..])
                    .find(|(q, np)| q.port == p.port && **np != 0)
                    .map(|(_, np)| *np);
                let np = match requested {
                    Some(np) => np,
                    None => match next(mirror, &mut fresh) {
                        Ok(np) => np,
                        Err(f) => {
                            result = Err(f);
                            break;
                        }
                    },
                };
                node_ports[i] = np;
                by_port.insert(p.port, np);
            }
            Some(&np) if node_ports[i] == 0 => node_ports[i] = np,
            Some(_) => {}
        }
    }
    let mut hc = None;
    if result.is_ok() && wants_health_check(svc) {
        hc = match spec.health_check_node_port.unwrap_or(0) {
            0 => match next(mirror, &mut fresh) {
                Ok(p) => Some(p),
                Err(f) => {
                    result = Err(f);
                    None
                }
            },
            p => Some(p),
        };
    }
    if let Err(f) = result {
        for p in fresh {
            mirror.release(p, &key);
        }
        return Plan::Full(f);
    }
    Plan::Assign {
        node_ports,
        health_check_node_port: hc,
    }
}

/// Writes an Assign or Clear plan into the Service (the fields kube-apiserver would store).
pub fn apply(plan: &Plan, svc: &mut Service) {
    let Some(spec) = svc.spec.as_mut() else {
        return;
    };
    match plan {
        Plan::Clear => {
            for p in spec.ports.iter_mut().flatten() {
                p.node_port = None;
            }
            spec.health_check_node_port = None;
        }
        Plan::Assign {
            node_ports,
            health_check_node_port,
        } => {
            for (p, np) in spec.ports.iter_mut().flatten().zip(node_ports) {
                p.node_port = (*np != 0).then_some(*np);
            }
            if health_check_node_port.is_some() {
                spec.health_check_node_port = *health_check_node_port;
            }
        }
        Plan::Nothing | Plan::Full(_) | Plan::Reject(_) => {}
    }
}

/// Ports an Assign plan adds that the Service did not carry.
pub fn new_ports(svc: &Service, plan: &Plan) -> Vec<i32> {
    let Plan::Assign {
        node_ports,
        health_check_node_port,
    } = plan
    else {
        return vec![];
    };
    let had: BTreeSet<i32> = collect_node_ports(svc).into_iter().collect();
    let mut v: Vec<i32> = node_ports
        .iter()
        .copied()
        .chain(*health_check_node_port)
        .filter(|p| *p != 0 && !had.contains(p))
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
