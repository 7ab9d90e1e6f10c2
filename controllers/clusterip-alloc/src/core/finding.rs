//! What upstream's ClusterIP repair loops report, worded as they word it.

use std::net::IpAddr;

use ipnet::IpNet;
use scm_allocator::{IpFamily, Report};
use scm_runtime::ObjectKey;

/// A problem upstream's ClusterIP repair loop reports, as an Event on the Service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Finding {
    /// Not an IP address.
    NotValid {
        /// The value as written.
        ip: String,
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
        /// The flag's CIDR of that family (`None` when ranges come from ServiceCIDRs).
        cidr: Option<IpNet>,
    },
    /// Already held by an older Service.
    Duplicate {
        /// The address.
        ip: IpAddr,
        /// Who holds it.
        holder: ObjectKey,
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
        }
    }

    fn action(&self) -> &'static str {
        match self {
            Finding::NotValid { .. } | Finding::FamilyNotConfigured { .. } => "ClusterIPValidation",
            _ => "ClusterIPAllocation",
        }
    }

    /// The `type` label of `apiserver_clusterip_repair_ip_errors_total`.
    fn metric_type(&self) -> &'static str {
        match self {
            Finding::NotValid { .. } | Finding::FamilyNotConfigured { .. } => "invalid",
            Finding::OutOfRange { .. } => "outOfRange",
            Finding::Duplicate { .. } => "duplicate",
            Finding::Full { .. } => "full",
        }
    }

    /// Worded as upstream's repair loops (repair.go for the flag, repairip.go for ServiceCIDRs).
    /// Upstream prints `<nil>` for an unparsable IP; we print what was written.
    fn message(&self) -> String {
        match self {
            Finding::NotValid { ip } => {
                format!("Cluster IP {ip} is not a valid IP; please recreate service")
            }
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
            Finding::Full { cidrs, family } => format!(
                "Service CIDR {cidrs} is full; you must widen the CIDR in order to create new services for Cluster IP [{family}]:"
            ),
        }
    }
}
