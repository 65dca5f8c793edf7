//! [`Flights`]: single flight for batches. A caller about to compute several missing
//! items claims their keys; a concurrent caller that needs one of those keys waits for
//! that result instead of computing it again.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};

use super::ContentKey;
use crate::error::{MlmfError, Result};

/// One computation in progress; waiters block until its value (or error) is set.
pub struct Flight<V> {
    slot: Mutex<Option<Result<V>>>,
    done: Condvar,
}

impl<V: Clone> Flight<V> {
    fn new() -> Self {
        Self {
            slot: Mutex::new(None),
            done: Condvar::new(),
        }
    }

    fn set(&self, value: Result<V>) {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(value);
        }
        self.done.notify_all();
    }

    /// Blocks until the leader sets the result; errors are shared as equal copies.
    pub fn wait(&self) -> Result<V> {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match slot.as_ref() {
                Some(Ok(v)) => return Ok(v.clone()),
                Some(Err(e)) => return Err(e.duplicate()),
                None => slot = self.done.wait(slot).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }
}

/// The computations in progress, by key.
pub struct Flights<V> {
    map: Mutex<HashMap<ContentKey, Arc<Flight<V>>>>,
}

impl<V> Default for Flights<V> {
    fn default() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
        }
    }
}

/// What [`Flights::claim`] hands back: the keys this caller now computes (through the
/// [`Leader`]), and the flights of the others to wait on, by position in the claim.
pub struct Claim<'a, V: Clone> {
    pub leader: Leader<'a, V>,
    pub waits: Vec<(usize, Arc<Flight<V>>)>,
}

/// The keys a caller computes. Every one must be finished; one dropped unfinished
/// (an error or a panic on the way) fails its waiters instead of leaving them blocked.
pub struct Leader<'a, V: Clone> {
    flights: &'a Flights<V>,
    /// `(position in the claim, key, flight)`.
    led: Vec<(usize, ContentKey, Arc<Flight<V>>)>,
}

impl<V: Clone> Flights<V> {
    /// Claims `keys` (distinct): those nobody computes yet are led by the caller, the
    /// others are returned to wait on.
    pub fn claim(&self, keys: &[ContentKey]) -> Claim<'_, V> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let mut led = Vec::new();
        let mut waits = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            match map.get(k) {
                Some(f) => waits.push((i, Arc::clone(f))),
                None => {
                    let f = Arc::new(Flight::new());
                    map.insert(*k, Arc::clone(&f));
                    led.push((i, *k, f));
                }
            }
        }
        Claim {
            leader: Leader { flights: self, led },
            waits,
        }
    }

    /// How many keys are being computed now.
    pub fn in_flight(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl<V: Clone> Leader<'_, V> {
    /// Positions (in the claim) of the keys this caller computes.
    pub fn positions(&self) -> Vec<usize> {
        self.led.iter().map(|(i, _, _)| *i).collect()
    }

    /// Publishes the results, `value(position)` for each led key, and releases them.
    pub fn finish(mut self, mut value: impl FnMut(usize) -> Result<V>) {
        let led = std::mem::take(&mut self.led);
        let mut map = self.flights.map.lock().unwrap_or_else(|e| e.into_inner());
        for (i, k, f) in led {
            f.set(value(i));
            map.remove(&k);
        }
    }

    /// Fails every led key with (a copy of) `err`.
    pub fn fail(self, err: &MlmfError) {
        self.finish(|_| Err(err.duplicate()));
    }
}

impl<V: Clone> Drop for Leader<'_, V> {
    fn drop(&mut self) {
        if self.led.is_empty() {
            return;
        }
        let mut map = self.flights.map.lock().unwrap_or_else(|e| e.into_inner());
        for (_, k, f) in self.led.drain(..) {
            f.set(Err(MlmfError::Internal(
                "the call computing this item stopped before finishing it".into(),
            )));
            map.remove(&k);
        }
    }
}
