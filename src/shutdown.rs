//! [`shutdown_signal`]: the future to hand to `Pipeline::run_until` for a clean stop.

/// Resolves when the process is asked to stop: SIGTERM (what Kubernetes, systemd and
/// `docker stop` send) or SIGINT / ctrl-c. Hand it to
/// [`Pipeline::run_until`](crate::core::pipeline::Pipeline::run_until), then call
/// [`Producer::close`](crate::core::producer::Producer::close) on the producers (see the README,
/// "Shutdown and health").
///
/// If a signal handler cannot be installed (no signal support, or the runtime has no signal
/// driver) the failure is logged and that signal is not waited for; when neither can be
/// installed the future never resolves, so the service runs on rather than stopping at once.
///
/// ```no_run
/// # async fn run<S, H>(pipeline: reliable::core::pipeline::Pipeline<S, H>, producer: reliable::core::producer::Producer)
/// # where S: reliable::core::DeliverySource, H: reliable::core::pipeline::Handler + 'static {
/// let stats = pipeline.run_until(reliable::shutdown_signal()).await;
/// producer.close().await;
/// # let _ = stats;
/// # }
/// ```
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            cannot_listen("SIGINT", &e);
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(e) => {
                cannot_listen("SIGTERM", &e);
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

fn cannot_listen(which: &str, e: &std::io::Error) {
    tracing::error!(signal = which, error = %e, "shutdown_signal cannot listen for this signal");
}
