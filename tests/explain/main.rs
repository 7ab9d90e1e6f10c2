//! `service-controller-manager explain` against the real local control plane: the manager
//! (with the local address-pool provider) serves one Service of each kind over the same pods,
//! then `explain` prints each: a ClusterIP, a NodePort, a LoadBalancer (also with
//! externalTrafficPolicy Local), a headless and an ExternalName Service, one whose selector
//! matches nothing, and one whose pods are left out for each reason. It runs as a
//! ServiceAccount that may only get and list, and its exit codes are checked.

mod harness;
mod kinds;
mod usage;
