//! What the port's handlers share: where the broker is in its life (recovering, serving,
//! stopping) and the console's rate history.

use std::sync::{Arc, RwLock};

use super::rates::RateHistory;
use crate::broker::Broker;
use crate::server::front::Front;

/// What the handlers share: the broker while it serves.
#[derive(Debug, Default)]
pub struct HttpState {
    pub(super) phase: RwLock<Phase>,
    /// The console's rate history, sampled while the broker serves.
    pub(super) rates: RateHistory,
}

#[derive(Debug, Default)]
pub(super) enum Phase {
    #[default]
    Recovering,
    Ready(Arc<Broker>, Arc<Front>),
    Stopping,
}

impl HttpState {
    /// The broker is open: `/readyz` and the API answer from now on.
    pub fn serve(&self, broker: Arc<Broker>, front: Arc<Front>) {
        // The first sample at once: a page loaded now has where its history starts.
        self.rates.sample(&broker);
        *self.phase.write().unwrap_or_else(|p| p.into_inner()) = Phase::Ready(broker, front);
    }

    /// The broker is closing: the port lets go of it (its data directory's lock goes with the
    /// last reference), and answers 503 until it stops.
    pub fn stopping(&self) {
        *self.phase.write().unwrap_or_else(|p| p.into_inner()) = Phase::Stopping;
    }

    pub(super) fn ready(&self) -> Option<(Arc<Broker>, Arc<Front>)> {
        match &*self.phase.read().unwrap_or_else(|p| p.into_inner()) {
            Phase::Ready(b, f) if !b.shutdown_token().is_cancelled() => {
                Some((Arc::clone(b), Arc::clone(f)))
            }
            _ => None,
        }
    }
}

/// The state as the handlers hold it.
pub(super) type Shared = Arc<HttpState>;
