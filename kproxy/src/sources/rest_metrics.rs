//! client-go's `rest_client_*` metrics for the agent's apiserver client: a tower layer around
//! kube-rs' HTTP stack that counts every request by status code, method and host, and times
//! it to its response headers (for a watch: until the stream starts, as client-go does).

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use futures::future::BoxFuture;
use tower::{Layer, Service};

use crate::metrics::Metrics;

/// Wraps a kube-rs service stack; `host` is the apiserver's `host:port` (requests inside the
/// stack carry only a path, the base URI is added further in).
#[derive(Clone)]
pub struct RestMetricsLayer {
    metrics: Arc<Metrics>,
    host: Arc<str>,
}

impl RestMetricsLayer {
    pub fn new(metrics: Arc<Metrics>, cluster_url: &http::Uri) -> Self {
        let host = cluster_url.authority().map_or_else(|| cluster_url.to_string(), |a| a.to_string());
        RestMetricsLayer { metrics, host: host.into() }
    }
}

impl<S> Layer<S> for RestMetricsLayer {
    type Service = RestMetrics<S>;
    fn layer(&self, inner: S) -> RestMetrics<S> {
        RestMetrics { inner, metrics: self.metrics.clone(), host: self.host.clone() }
    }
}

/// The service [`RestMetricsLayer`] makes.
#[derive(Clone)]
pub struct RestMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
    host: Arc<str>,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for RestMetrics<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let method = request.method().as_str().to_owned();
        let (metrics, host) = (self.metrics.clone(), self.host.clone());
        let started = Instant::now();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            let code = response.as_ref().ok().map(|r| r.status().as_u16());
            metrics.observe_rest_request(&host, &method, code, started.elapsed().as_secs_f64());
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt as _;

    #[tokio::test]
    async fn every_request_is_counted_by_code_method_and_host_and_timed() {
        let metrics = Arc::new(Metrics::new());
        let layer = RestMetricsLayer::new(metrics.clone(), &"https://10.0.0.1:6443".parse().unwrap());
        let answer = |status: u16| {
            tower::service_fn(move |_req: http::Request<()>| async move {
                Ok::<_, std::io::Error>(http::Response::builder().status(status).body(()).unwrap())
            })
        };
        for _ in 0..2 {
            layer.layer(answer(200)).oneshot(http::Request::get("/api/v1/services").body(()).unwrap()).await.unwrap();
        }
        layer.layer(answer(410)).oneshot(http::Request::get("/api/v1/services?watch=1").body(()).unwrap()).await.unwrap();
        let failing = tower::service_fn(|_req: http::Request<()>| async { Err::<http::Response<()>, _>(std::io::Error::other("refused")) });
        let _ = layer.layer(failing).oneshot(http::Request::post("/apis/events.k8s.io/v1/events").body(()).unwrap()).await;

        let text = metrics.encode();
        for line in [
            r#"rest_client_requests_total{code="200",host="10.0.0.1:6443",method="GET"} 2"#,
            r#"rest_client_requests_total{code="410",host="10.0.0.1:6443",method="GET"} 1"#,
            r#"rest_client_requests_total{code="<error>",host="10.0.0.1:6443",method="POST"} 1"#,
            r#"rest_client_request_duration_seconds_count{verb="GET",host="10.0.0.1:6443"} 3"#,
            r#"rest_client_request_duration_seconds_bucket{le="60.0",verb="POST",host="10.0.0.1:6443"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in:\n{text}");
        }
    }
}
