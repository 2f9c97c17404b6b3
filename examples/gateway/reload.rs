//! SIGHUP: the configuration file read again and applied without a restart.
//!
//! The file goes through the checks of a start (`cli::checked`, as `--check-config`). A file
//! with problems changes nothing: each problem is logged at `ERROR` with its field, and
//! `gateway_config_reloads_total{result="failed"}` counts it. A valid one is built into a new
//! router (routes, API keys, rate-limit layer) that replaces the running one at once;
//! requests in flight finish on the router they started with. A SIGHUP to a gateway running
//! its built-in configuration (no `--config`) has no file to read: it is logged and counted
//! nowhere.
//!
//! - The counters survive: the new layer is built on the running store, and a bucket is a
//!   rule's name and a key. A rule that keeps its name, key and algorithm keeps its counts,
//!   and a new limit applies to them (3 of an rpm of 5 used, then a reload to 4: one more
//!   request is admitted). Concurrency slots taken before a reload are released by the
//!   requests that hold them, into the same buckets.
//! - A model's adaptive capacity (`[models.NAME.capacity]`) keeps the limit its controller
//!   learned when the reload leaves its `min`, `max`, `initial`, `latency_target_ms`,
//!   `latency_tolerance`, `interval_ms`, `decrease` and `baseline_window_secs` as they were
//!   (tiers' priorities, `saturation` and `queue_len` may change); else it starts afresh.
//! - What only a restart can change keeps its running value, and each changed key is named
//!   in a `WARN` line: `listen`, `[server] header_timeout_secs` and `max_connections` (the
//!   accept loop's), every key of `[store]` (the counters live there), `[mock]
//!   token_delay_ms` (the mock runs from the first configuration that uses it).
//! - `[mock] capacity` and `queue` apply to the running mock: completions in flight keep
//!   running, their next tokens timed by the new capacity.
//! - Every other key is reloaded; `gateway.toml` says which of the two each key is.
//! - `--listen` and `--redis` (or their environment variables) still override the file.
//! - A model on `upstream = "mock"` starts the mock model if no configuration had one yet;
//!   a model gone from the file is answered 404 like any unknown model.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::Router;
use tower_llm_ratelimit::RateLimitLayer;

use crate::cli::{self, Flags, Problems};
use crate::config::Config;
use crate::limits;
use crate::metrics::Metrics;
use crate::mock;
use crate::server;

/// What the gateway runs, and what a reload needs to build the next one.
pub(crate) struct Running {
    pub(crate) flags: Flags,
    /// No `--config`: nothing to read again.
    pub(crate) builtin: bool,
    /// The configuration in force (the keys that need a restart at their start-up values).
    pub(crate) cfg: Config,
    pub(crate) store: limits::Store,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) mock: mock::OnDemand,
    /// The upstream clients: their connection pools outlive reloads.
    pub(crate) clients: crate::upstream::Clients,
    /// The router the server reads for each request.
    pub(crate) router: Arc<ArcSwap<Router>>,
    /// The rate-limit layer of `router`.
    pub(crate) layer: RateLimitLayer,
}

/// Reloads on demand; knows the layers whose settlements shutdown waits for.
pub(crate) struct Reloader {
    running: Running,
    /// Layers replaced by reloads whose settlements may still be running in the background:
    /// only a store doing I/O (Redis) settles there, so only then are they kept, for
    /// [`Reloader::flush`], until nothing uses them (checked at each reload and by
    /// [`Reloader::prune_retired`], which the main loop calls every [`PRUNE_EVERY`]: a
    /// retired layer may share capacity queues with the running one, and so keep its cells
    /// from being evicted).
    retired: Vec<RateLimitLayer>,
}

impl Reloader {
    pub(crate) fn new(running: Running) -> Self {
        Self {
            running,
            retired: Vec::new(),
        }
    }

    /// The configuration in force.
    pub(crate) fn config(&self) -> &Config {
        &self.running.cfg
    }

    /// Waits for the settlements of every layer the gateway has run (`RateLimitLayer::flush`).
    pub(crate) async fn flush(&self) {
        self.running.layer.flush().await;
        for layer in &self.retired {
            layer.flush().await;
        }
    }

    /// Drops the retired layers nothing uses any more (see `retired`).
    pub(crate) fn prune_retired(&mut self) {
        prune(&mut self.retired);
    }

    /// Reads the configuration file again and applies it, or keeps the running one.
    pub(crate) async fn reload(&mut self) {
        if self.running.builtin {
            tracing::warn!(
                "SIGHUP: no configuration file to reload (the gateway runs its built-in \
                 configuration; start it with --config FILE to reload one)"
            );
            return;
        }
        let file = cli::source(&self.running.flags).to_owned();
        tracing::info!(%file, "SIGHUP: reloading the configuration");
        match self.apply().await {
            Ok(changes) => {
                changes.log(&file);
                self.running.metrics.reload(true);
            }
            Err(problems) => {
                for problem in &problems.list {
                    tracing::error!(%file, %problem, "configuration problem");
                }
                tracing::error!(
                    %file,
                    problems = problems.list.len(),
                    "configuration not reloaded: keeping the running one"
                );
                self.running.metrics.reload(false);
            }
        }
    }

    async fn apply(&mut self) -> Result<Changes, Problems> {
        let r = &mut self.running;
        let (mut next, _) = cli::checked(&r.flags)?;
        for key in keep_restart_only(&r.cfg, &mut next) {
            tracing::warn!(
                key,
                "`{key}` changed in the file, but only a restart applies it: keeping the \
                 running value"
            );
        }
        if let Some(problem) = crate::max_keys_problem(&next) {
            return Err(Problems {
                source: None,
                list: vec![problem],
            });
        }
        let mock_url = r.mock.url_for(&next).await.map_err(|e| Problems {
            source: None,
            list: vec![format!("could not start the mock model: {e}")],
        })?;
        let app = crate::build(
            &next,
            &r.store,
            &r.metrics,
            &r.clients,
            mock_url.as_deref(),
            Some(&r.layer),
        )
        .map_err(|e| Problems {
            source: None,
            list: vec![e],
        })?;
        let layer = app.layer.clone();
        let sessions_generation = app.dashboard.generation();
        // Before the new routes serve anything.
        r.mock.configure(&next.mock);
        r.router.store(Arc::new(server::router(app)));
        let old = std::mem::replace(&mut r.layer, layer);
        if matches!(r.store, limits::Store::Memory(_)) {
            // Memory settlements happen in the request's own task: nothing to wait for.
            drop(old);
        } else {
            // Layers no request, body or settlement uses any more have nothing left to
            // flush: dropped, so that reloads don't accumulate them (and their key tables).
            prune(&mut self.retired);
            self.retired.push(old);
        }
        // The sessions of removed admin keys end now, not when next looked at (a key removed
        // and added again would bring them back); a sign-in whose key the replaced
        // configuration checked opens none after this (the new one's generation starts).
        let generation = r
            .metrics
            .board
            .sessions
            .retain_keys(&next.server.admin_keys);
        debug_assert_eq!(generation, sessions_generation);
        let changes = Changes::between(&r.cfg, &next);
        r.cfg = next;
        Ok(changes)
    }
}

/// How often the main loop drops the retired layers nothing uses any more
/// ([`Reloader::prune_retired`]).
pub(crate) const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Drops the layers no request, body or settlement uses any more: they have nothing left to
/// flush.
fn prune(retired: &mut Vec<RateLimitLayer>) {
    retired.retain(|layer| !layer.is_unused());
}

/// Puts the running values of the keys only a restart applies into `next`; returns the keys
/// whose value `next` had changed.
fn keep_restart_only(running: &Config, next: &mut Config) -> Vec<&'static str> {
    // Every key of `[store]` needs a restart: destructured, so that a new one can't be
    // forgotten below.
    let crate::config::StoreConfig {
        kind: _,
        url: _,
        cluster: _,
        prefix: _,
        timeout_ms: _,
        on_failure: _,
        expected_replicas: _,
        max_keys: _,
    } = &running.store;
    let mut changed = Vec::new();
    macro_rules! keep {
        ($($field:ident).+, $name:literal) => {
            if next.$($field).+ != running.$($field).+ {
                changed.push($name);
                next.$($field).+ = running.$($field).+.clone();
            }
        };
    }
    keep!(listen, "listen");
    keep!(server.header_timeout_secs, "server.header_timeout_secs");
    keep!(server.max_connections, "server.max_connections");
    keep!(store.kind, "store.kind");
    keep!(store.url, "store.url");
    keep!(store.cluster, "store.cluster");
    keep!(store.prefix, "store.prefix");
    keep!(store.timeout_ms, "store.timeout_ms");
    keep!(store.on_failure, "store.on_failure");
    keep!(store.expected_replicas, "store.expected_replicas");
    keep!(store.max_keys, "store.max_keys");
    keep!(mock.token_delay_ms, "mock.token_delay_ms");
    changed
}

/// What a reload changed: names of models and tiers, counts only for API keys (they are
/// secrets).
#[derive(Debug, Default, PartialEq)]
struct Changes {
    models: Diff,
    tiers: Diff,
    keys: Diff,
    limiter: bool,
    server: bool,
    mock: bool,
}

#[derive(Debug, Default, PartialEq)]
struct Diff {
    added: Vec<String>,
    removed: Vec<String>,
    changed: Vec<String>,
}

impl Diff {
    fn of<V: PartialEq>(old: &BTreeMap<String, V>, new: &BTreeMap<String, V>) -> Self {
        let mut d = Diff::default();
        for (k, v) in new {
            match old.get(k) {
                None => d.added.push(k.clone()),
                Some(o) if o != v => d.changed.push(k.clone()),
                Some(_) => {}
            }
        }
        d.removed = old
            .keys()
            .filter(|k| !new.contains_key(*k))
            .cloned()
            .collect();
        d
    }
}

impl Changes {
    fn between(old: &Config, new: &Config) -> Self {
        Self {
            models: Diff::of(&old.models, &new.models),
            tiers: Diff::of(&old.tiers, &new.tiers),
            keys: Diff::of(&old.keys, &new.keys),
            limiter: old.limiter != new.limiter,
            server: old.server != new.server,
            mock: old.mock != new.mock,
        }
    }

    fn log(&self, file: &str) {
        let (m, t, k) = (&self.models, &self.tiers, &self.keys);
        tracing::info!(
            %file,
            models_added = ?m.added,
            models_removed = ?m.removed,
            models_changed = ?m.changed,
            tiers_added = ?t.added,
            tiers_removed = ?t.removed,
            tiers_changed = ?t.changed,
            keys_added = k.added.len(),
            keys_removed = k.removed.len(),
            keys_changed = k.changed.len(),
            limiter_changed = self.limiter,
            server_changed = self.server,
            mock_changed = self.mock,
            "configuration reloaded"
        );
    }
}

/// SIGHUP, as a stream of wake-ups; never on a platform without it.
pub(crate) struct Hangups {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangups {
    /// Installs the handler (SIGHUP no longer ends the process).
    pub(crate) fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let signal = signal(SignalKind::hangup())
                .map_err(|e| tracing::warn!(error = %e, "SIGHUP can't be handled: no reloads"))
                .ok();
            Self { signal }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// The next SIGHUP.
    pub(crate) async fn next(&mut self) {
        #[cfg(unix)]
        if let Some(s) = &mut self.signal {
            if s.recv().await.is_some() {
                return;
            }
            self.signal = None;
        }
        std::future::pending().await
    }
}

#[cfg(test)]
mod tests {
    use tower::Layer;
    use tower_llm_ratelimit::{key, Quota, RateLimitLayer, Rule};

    fn layer() -> RateLimitLayer {
        RateLimitLayer::builder()
            .rule(Rule::new("rpm", key::global(), Quota::per_minute(60)))
            .build()
            .expect("a valid layer")
    }

    /// Without a reload: the periodic prune drops a retired layer nothing uses any more (it
    /// could pin the running layer's capacity cells), and keeps one a service still uses.
    #[test]
    fn prune_drops_retired_layers_nothing_uses() {
        let (unused, used) = (layer(), layer());
        let service = used.layer(tower::service_fn(|_: ()| async { Ok::<_, ()>(()) }));
        let mut retired = vec![unused, used];
        super::prune(&mut retired);
        assert_eq!(retired.len(), 1, "the unused layer is dropped");
        assert!(!retired[0].is_unused(), "the used one is kept");
        drop(service);
        super::prune(&mut retired);
        assert!(retired.is_empty());
    }
}
