//! Sources turn outside objects into Kubernetes API objects; they know nothing of maps.
//! Every source hands the same types to [`crate::model::Snapshot::build`].

pub mod apiserver;
pub mod manifests;
pub mod rest_metrics;
pub mod settle;
