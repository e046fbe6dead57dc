//! Sources turn outside objects into Kubernetes API objects; they know nothing of maps.
//! Every source pushes the same [`update::Update`]s, which the proxier applies to its store.

pub mod apiserver;
pub mod manifests;
pub mod rest_metrics;
pub mod settle;
pub mod update;
