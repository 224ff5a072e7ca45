//! Single-flight: concurrent callers that want the same key's value share one load.
//!
//! The first caller for a key starts a flight; callers that arrive while it is in the air
//! wait for its result instead of running their own. A flight leaves the table when it
//! lands, so a later miss starts a new one. If the caller running the load is cancelled
//! (its future dropped), one of the waiters takes the load over; nobody is left waiting on
//! a flight nobody flies.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::OnceCell;

use crate::Error;

type Flight = Arc<OnceCell<Result<Bytes, Error>>>;

/// Flights in the air, by key.
#[derive(Debug, Default)]
pub(crate) struct Flights {
    in_air: Mutex<HashMap<Bytes, Flight>>,
}

impl Flights {
    /// Runs `load` for `key`, unless a flight for `key` is already in the air: then waits
    /// for that one's result.
    pub(crate) async fn run<F, Fut>(&self, key: Bytes, load: F) -> Result<Bytes, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Bytes, Error>>,
    {
        let flight = Arc::clone(
            self.in_air
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(key.clone())
                .or_default(),
        );
        let result = flight.get_or_init(load).await.clone();
        let mut in_air = self.in_air.lock().unwrap_or_else(|e| e.into_inner());
        if in_air.get(&key).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
            in_air.remove(&key);
        }
        result
    }

    /// Flights in the air (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.in_air.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_share_one_load_and_the_table_empties() {
        let flights = Arc::new(Flights::default());
        let loads = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..500 {
            let (flights, loads) = (Arc::clone(&flights), Arc::clone(&loads));
            tasks.spawn(async move {
                flights
                    .run(Bytes::from_static(b"k"), || async {
                        loads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Ok(Bytes::from_static(b"v"))
                    })
                    .await
            });
        }
        while let Some(r) = tasks.join_next().await {
            assert_eq!(r.expect("task").expect("value"), "v");
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn an_error_is_shared_too_and_the_next_miss_flies_again() {
        let flights = Flights::default();
        let err = flights
            .run(Bytes::from_static(b"k"), || async {
                Err(Error::Unavailable("down".into()))
            })
            .await;
        assert!(matches!(err, Err(Error::Unavailable(_))));
        let ok = flights
            .run(Bytes::from_static(b"k"), || async {
                Ok(Bytes::from_static(b"v"))
            })
            .await;
        assert_eq!(ok.expect("second flight"), "v");
    }

    #[tokio::test]
    async fn a_cancelled_loader_hands_the_load_to_a_waiter() {
        let flights = Arc::new(Flights::default());
        let f = Arc::clone(&flights);
        let leader = tokio::spawn(async move {
            f.run(Bytes::from_static(b"k"), || async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(Bytes::from_static(b"never"))
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let f = Arc::clone(&flights);
        let waiter = tokio::spawn(async move {
            f.run(Bytes::from_static(b"k"), || async {
                Ok(Bytes::from_static(b"w"))
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        leader.abort();
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter is not stranded")
            .expect("task");
        assert_eq!(got.expect("value"), "w");
    }
}
