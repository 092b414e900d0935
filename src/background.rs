//! Background threads: work that must never run on a proxy worker (plugin reload and ticks,
//! peer health checks and DNS refresh), each on a thread of its own with a current-thread
//! tokio runtime.

/// Runs the future `make` builds on a thread of its own (`name`) with a current-thread tokio
/// runtime. `what` names the feature in the error logged when the thread cannot start.
pub fn spawn<F>(name: &str, what: &'static str, make: impl FnOnce() -> F + Send + 'static)
where
    F: std::future::Future<Output = ()>,
{
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(make()),
                Err(e) => log::error!("cannot start a runtime for {what} ({e}); it is disabled"),
            }
        });
    if let Err(e) = spawned {
        log::error!("cannot start the {name} thread ({e}); {what} is disabled");
    }
}
