//! What the reporter could not send while the server was down, kept in order to be sent
//! once it is back: bounded, the oldest dropped first (and counted), so an outage costs the
//! program a fixed amount of memory at most.

use std::collections::VecDeque;

use uuid::Uuid;

use crate::model::{Event, LogCreate, StateCreate};

/// One piece of deferred work, its flow run already resolved to the server's id.
#[derive(Debug)]
pub(crate) enum Deferred {
    Event(Box<Event>),
    Log(LogCreate),
    /// A flow run's state: the server's id of the run, and the state.
    State(Uuid, Box<StateCreate>),
}

/// The next request to make from the front of the backlog.
#[derive(Debug)]
pub(crate) enum Batch {
    Events(Vec<Event>),
    Logs(Vec<LogCreate>),
    State(Uuid, Box<StateCreate>),
}

/// Deferred work, oldest first, at most `capacity` pieces.
#[derive(Debug)]
pub(crate) struct Backlog {
    items: VecDeque<Deferred>,
    capacity: usize,
    /// Pieces dropped to make room since the last [`Backlog::take_dropped`].
    dropped: usize,
}

impl Backlog {
    pub(crate) fn new(capacity: usize) -> Self {
        Self { items: VecDeque::new(), capacity: capacity.max(1), dropped: 0 }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    /// Adds a piece at the back; when full, the oldest piece goes.
    pub(crate) fn push(&mut self, item: Deferred) {
        if self.items.len() == self.capacity {
            self.items.pop_front();
            self.dropped += 1;
        }
        self.items.push_back(item);
    }

    /// How many pieces were dropped to make room, since the last call.
    pub(crate) fn take_dropped(&mut self) -> usize {
        std::mem::take(&mut self.dropped)
    }

    /// Takes the next request's worth from the front: consecutive events (at most
    /// `max_events`), consecutive logs (at most `max_logs`), or one state.
    pub(crate) fn take_batch(&mut self, max_events: usize, max_logs: usize) -> Option<Batch> {
        let mut batch = match self.items.pop_front()? {
            Deferred::Event(event) => Batch::Events(vec![*event]),
            Deferred::Log(log) => Batch::Logs(vec![log]),
            Deferred::State(id, state) => return Some(Batch::State(id, state)),
        };
        loop {
            match (&mut batch, self.items.front()) {
                (Batch::Events(events), Some(Deferred::Event(_))) if events.len() < max_events => {
                    let Some(Deferred::Event(event)) = self.items.pop_front() else { unreachable!() };
                    events.push(*event);
                }
                (Batch::Logs(logs), Some(Deferred::Log(_))) if logs.len() < max_logs => {
                    let Some(Deferred::Log(log)) = self.items.pop_front() else { unreachable!() };
                    logs.push(log);
                }
                _ => return Some(batch),
            }
        }
    }

    /// Puts a batch that could not be sent back at the front, in its order.
    pub(crate) fn put_back(&mut self, batch: Batch) {
        let items: Vec<Deferred> = match batch {
            Batch::Events(events) => events.into_iter().map(|e| Deferred::Event(Box::new(e))).collect(),
            Batch::Logs(logs) => logs.into_iter().map(Deferred::Log).collect(),
            Batch::State(id, state) => vec![Deferred::State(id, state)],
        };
        for item in items.into_iter().rev() {
            self.items.push_front(item);
        }
        while self.items.len() > self.capacity {
            self.items.pop_back();
            self.dropped += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(message: &str) -> Deferred {
        Deferred::Log(LogCreate {
            name: "test".into(),
            level: 20,
            message: message.into(),
            timestamp: chrono::Utc::now(),
            flow_run_id: None,
            task_run_id: None,
        })
    }

    fn state(name: &str) -> Deferred {
        Deferred::State(Uuid::nil(), Box::new(StateCreate::new(&name.to_uppercase(), name)))
    }

    fn messages(batch: &Batch) -> Vec<String> {
        match batch {
            Batch::Logs(logs) => logs.iter().map(|l| l.message.clone()).collect(),
            Batch::State(_, state) => vec![state.name.clone()],
            Batch::Events(events) => events.iter().map(|e| e.event.clone()).collect(),
        }
    }

    #[test]
    fn batches_keep_the_order_and_stop_at_a_state_or_the_limit() {
        let mut backlog = Backlog::new(100);
        for item in [log("a"), log("b"), log("c"), state("Completed"), log("d")] {
            backlog.push(item);
        }
        let first = backlog.take_batch(500, 2).unwrap();
        assert_eq!(messages(&first), ["a", "b"]);
        assert_eq!(messages(&backlog.take_batch(500, 2).unwrap()), ["c"]);
        assert_eq!(messages(&backlog.take_batch(500, 2).unwrap()), ["Completed"]);
        backlog.put_back(first);
        assert_eq!(messages(&backlog.take_batch(500, 10).unwrap()), ["a", "b", "d"]);
        assert!(backlog.take_batch(500, 10).is_none());
    }

    #[test]
    fn a_full_backlog_drops_the_oldest_and_counts_them() {
        let mut backlog = Backlog::new(3);
        for message in ["1", "2", "3", "4", "5"] {
            backlog.push(log(message));
        }
        assert_eq!(backlog.len(), 3);
        assert_eq!(backlog.take_dropped(), 2);
        assert_eq!(backlog.take_dropped(), 0);
        assert_eq!(messages(&backlog.take_batch(500, 10).unwrap()), ["3", "4", "5"]);
    }
}
