//! Helpers shared by the benchmarks.

/// Polls a future that never waits (a CPU-only call behind an async signature) without
/// a runtime, so the measurement holds the call and nothing else.
pub(crate) fn ready<F: std::future::Future>(future: F) -> F::Output {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(future).poll(&mut cx) {
        std::task::Poll::Ready(output) => output,
        std::task::Poll::Pending => panic!("the benchmarked call waited on something"),
    }
}

/// A two-worker runtime, like the machines this project measures on.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}
