//! `service-controller-manager explain` against the real local control plane.
