//! The model: Services and EndpointSlices reduced to what the dataplane serves, validated,
//! along the seams of kube-proxy's `pkg/proxy`.
//!
//! - `types`: what the other parts share: [`Protocol`], [`FrontendKind`], [`Frontend`],
//!   [`ServicePortName`], and the [`InvalidObject`] errors that name the object and the field.
//! - `service`: a Service's validation into a [`ServiceInfo`] and its ports (kube-proxy's
//!   `serviceport.go` and what its `ServiceChangeTracker` keeps).
//! - `endpoints`: an EndpointSlice's validation into a [`SliceInfo`] (what kube-proxy's
//!   `EndpointSliceCache` keeps).
//! - `selection`: which endpoints a service port uses (kube-proxy's `CategorizeEndpoints`:
//!   ready, terminating fallback, traffic policies, topology hints).
//! - `frontends`: [`service_frontends`], a Service joined with its slices into one
//!   [`DesiredService`] per frontend (ClusterIP, external IPs, load-balancer IPs, a NodePort per
//!   node address), with the second backend set of clients in the cluster where a `Local`
//!   external policy needs one.
//!
//! Sources hand Kubernetes objects to [`crate::tracker::ModelStore`], which validates them with
//! [`ServiceInfo::from_service`] and [`SliceInfo::from_slice`] and joins them with
//! [`service_frontends`]. Invalid objects become [`InvalidObject`] errors; they are skipped and
//! never affect other objects.

mod endpoints;
mod fields;
mod frontends;
mod selection;
mod service;
mod types;

#[cfg(test)]
pub(crate) mod test_support;

pub use endpoints::{EndpointInfo, Placement, SliceInfo, SlicePort, LABEL_SERVICE_NAME};
pub use frontends::{service_frontends, DesiredService, DesiredState};
pub use selection::NodeTopology;
pub use service::{
    ServiceInfo, ServiceOutcome, ServicePortInfo, DEFAULT_AFFINITY_TIMEOUT_SECONDS, LABEL_HEADLESS,
    LABEL_SERVICE_PROXY_NAME, MAX_AFFINITY_TIMEOUT_SECONDS,
};
pub use types::{Frontend, FrontendKind, Ignored, InvalidCode, InvalidObject, Protocol, ServicePortName};

pub use crate::node::Cidr;
