//! What upstream's ClusterIP repair loops report (`repair.go`, `repairip.go`), worded as they
//! word it.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use scm_allocator::{IpFamily, Report};
use scm_runtime::ObjectKey;

/// How long a finding comparing IPAddresses with Services must stand before it is reported.
pub const SETTLE: Duration = Duration::from_secs(1);

/// A problem upstream's ClusterIP repair loops report, as an Event on the Service (on the
/// IPAddress for the `Ip*` ones).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Finding {
    /// Not an IP address.
    NotValid {
        /// The value as written.
        ip: String,
        /// Worded as repairip.go ("recreate Service": ranges from ServiceCIDRs, or an API
        /// server that keeps IPAddresses), else as repair.go ("recreate service").
        service_cidrs: bool,
    },
    /// An address of a family no range is configured for.
    FamilyNotConfigured {
        /// The address.
        ip: IpAddr,
    },
    /// Outside every configured range.
    OutOfRange {
        /// The address.
        ip: IpAddr,
        /// The flag's CIDR of that family, as repair.go words it; `None` as repairip.go words it
        /// (ranges from ServiceCIDRs, or an API server that keeps IPAddresses).
        cidr: Option<IpNet>,
    },
    /// Already held by an older Service.
    Duplicate {
        /// The address.
        ip: IpAddr,
        /// Who holds it.
        holder: ObjectKey,
    },
    /// A ClusterIP with no IPAddress object (the API server's repair creates it).
    NotAllocated {
        /// The address.
        ip: IpAddr,
    },
    /// A ClusterIP whose IPAddress names no Service, or a Service that does not exist (the
    /// API server's repair recreates it).
    BadReference {
        /// The address.
        ip: IpAddr,
        /// The Service holding the address.
        service: ObjectKey,
    },
    /// An IPAddress of the API server's allocator that does not reference a Service.
    IpNotAService {
        /// The IPAddress's name.
        name: String,
        /// Its parentRef, as upstream prints it.
        parent: String,
    },
    /// An IPAddress of the API server's allocator whose Service does not exist.
    IpLeaked {
        /// The IPAddress's name.
        name: String,
        /// The Service its parentRef names.
        service: ObjectKey,
        /// Upstream waits until the IPAddress is 60 s old.
        not_before: SystemTime,
    },
    /// An IPAddress of the API server's allocator whose Service does not hold its address.
    IpWrongReference {
        /// The IPAddress's name.
        name: String,
        /// The Service its parentRef names.
        service: ObjectKey,
        /// Upstream's waiting windows (ExternalName Services, IPAddresses newer than the Service).
        not_before: SystemTime,
    },
    /// No address left for a Service that needs one.
    Full {
        /// The family's CIDRs.
        cidrs: String,
        /// The family.
        family: IpFamily,
    },
}

impl Report for Finding {
    fn reason(&self) -> &'static str {
        match self {
            Finding::NotValid { .. } | Finding::FamilyNotConfigured { .. } => "ClusterIPNotValid",
            Finding::OutOfRange { .. } => "ClusterIPOutOfRange",
            Finding::Duplicate { .. } => "ClusterIPAlreadyAllocated",
            Finding::Full { .. } => "ServiceCIDRFull",
            Finding::NotAllocated { .. } | Finding::BadReference { .. } => "ClusterIPNotAllocated",
            Finding::IpNotAService { .. } | Finding::IpLeaked { .. } => "IPAddressNotAllocated",
            Finding::IpWrongReference { .. } => "IPAddressWrongReference",
        }
    }

    fn action(&self) -> &'static str {
        match self {
            Finding::NotValid { .. } | Finding::FamilyNotConfigured { .. } => "ClusterIPValidation",
            Finding::IpNotAService { .. }
            | Finding::IpLeaked { .. }
            | Finding::IpWrongReference { .. } => "IPAddressAllocation",
            _ => "ClusterIPAllocation",
        }
    }

    /// The `type` label of `apiserver_clusterip_repair_ip_errors_total`. Upstream's IPAddress
    /// loop counts nothing; we count its findings under the bitmap loop's names for the same
    /// situations: a ClusterIP the state lacks is `repair`, state no Service accounts for is
    /// `leak`.
    fn metric_type(&self) -> &'static str {
        match self {
            Finding::NotValid { .. } | Finding::FamilyNotConfigured { .. } => "invalid",
            Finding::OutOfRange { .. } => "outOfRange",
            Finding::Duplicate { .. } => "duplicate",
            Finding::Full { .. } => "full",
            Finding::NotAllocated { .. } | Finding::BadReference { .. } => "repair",
            Finding::IpNotAService { .. }
            | Finding::IpLeaked { .. }
            | Finding::IpWrongReference { .. } => "leak",
        }
    }

    fn not_before(&self) -> Option<SystemTime> {
        match self {
            Finding::IpLeaked { not_before, .. } | Finding::IpWrongReference { not_before, .. } => {
                Some(*not_before)
            }
            _ => None,
        }
    }

    /// Findings that compare IPAddresses with Services wait [`SETTLE`]: the two watches can be
    /// a moment apart (a Service deleted shows before its IPAddress's deletion).
    fn settle(&self) -> Duration {
        match self {
            Finding::NotAllocated { .. }
            | Finding::BadReference { .. }
            | Finding::IpNotAService { .. }
            | Finding::IpLeaked { .. }
            | Finding::IpWrongReference { .. } => SETTLE,
            _ => Duration::ZERO,
        }
    }

    /// Worded as upstream's repair loops (repairip.go wherever the API server keeps IPAddresses
    /// or ranges come from ServiceCIDRs, repair.go on the bitmap path with the flag).
    /// Upstream prints `<nil>` for an unparsable IP; we print what was written.
    fn message(&self) -> String {
        match self {
            Finding::NotValid { ip, service_cidrs } => format!(
                "Cluster IP {ip} is not a valid IP; please recreate {}",
                if *service_cidrs { "Service" } else { "service" }
            ),
            Finding::FamilyNotConfigured { ip } => format!(
                "Cluster IP {ip}({}) is of ip family that is no longer configured on cluster; please recreate service",
                IpFamily::of(ip)
            ),
            Finding::OutOfRange { ip, cidr: Some(c) } => format!(
                "Cluster IP [{}]:{ip} is not within the service CIDR {c}; please recreate service",
                IpFamily::of(ip)
            ),
            Finding::OutOfRange { ip, cidr: None } => format!(
                "Cluster IP [{}]: {ip} is not within any configured Service CIDR; please recreate service",
                IpFamily::of(ip)
            ),
            Finding::Duplicate { ip, .. } => format!(
                "Cluster IP [{}]:{ip} was assigned to multiple services; please recreate service",
                IpFamily::of(ip)
            ),
            Finding::NotAllocated { ip } => format!(
                "Cluster IP [{}]: {ip} is not allocated; repairing",
                IpFamily::of(ip)
            ),
            Finding::BadReference { ip, service } => format!(
                "the ClusterIP [{}]: {ip} for Service {service} has a wrong reference; repairing",
                IpFamily::of(ip)
            ),
            Finding::IpNotAService { name, parent } => format!(
                "IPAddress {name} appears to have been modified, not referencing a Service {parent}: cleaning up"
            ),
            Finding::IpLeaked { name, service, .. } => {
                format!(
                    "IPAddress: {name} for Service {service} appears to have leaked: cleaning up"
                )
            }
            Finding::IpWrongReference { name, service, .. } => {
                format!(
                    "IPAddress: {name} for Service {service} has a wrong reference; cleaning up"
                )
            }
            Finding::Full { cidrs, family } => format!(
                "Service CIDR {cidrs} is full; you must widen the CIDR in order to create new services for Cluster IP [{family}]:"
            ),
        }
    }
}
