//! Commands on their way to the bridge: senders append frames, one thread writes them.
//!
//! A flow that submits a thousand runs in a loop would otherwise make a thousand write
//! calls, and the bridge a thousand reads; here the frames that pile up while one write is
//! under way go together in the next.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

#[derive(Default)]
struct Pending {
    frames: Vec<u8>,
    writer_waiting: bool,
    closing: bool,
    failed: Option<String>,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    ready: Condvar,
}

/// The sending side; [`Outbox::close`] writes what is pending and closes the pipe.
pub(crate) struct Outbox {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Outbox {
    /// Starts the thread that writes to `pipe`.
    pub(crate) fn new(mut pipe: impl Write + Send + 'static) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let thread_shared = shared.clone();
        let writer = std::thread::Builder::new().name("prefect-ray-commands".into()).spawn(move || {
            let shared = thread_shared;
            loop {
                let frames = {
                    let mut pending = lock(&shared.pending);
                    while pending.frames.is_empty() && !pending.closing {
                        pending.writer_waiting = true;
                        pending = shared.ready.wait(pending).unwrap_or_else(|p| p.into_inner());
                        pending.writer_waiting = false;
                    }
                    if pending.frames.is_empty() {
                        return;
                    }
                    std::mem::take(&mut pending.frames)
                };
                if let Err(error) = pipe.write_all(&frames).and_then(|()| pipe.flush()) {
                    lock(&shared.pending).failed = Some(error.to_string());
                    return;
                }
            }
        })?;
        Ok(Self { shared, writer: Mutex::new(Some(writer)) })
    }

    /// Queues a frame that `encode` appends to the buffer it is given.
    ///
    /// # Errors
    ///
    /// If the pipe broke or the outbox is closed.
    pub(crate) fn send(&self, encode: impl FnOnce(&mut Vec<u8>) -> std::io::Result<()>) -> Result<(), String> {
        let mut pending = lock(&self.shared.pending);
        if let Some(error) = &pending.failed {
            return Err(error.clone());
        }
        if pending.closing {
            return Err("the Ray bridge has shut down".to_owned());
        }
        encode(&mut pending.frames).map_err(|e| e.to_string())?;
        if pending.writer_waiting {
            self.shared.ready.notify_one();
        }
        Ok(())
    }

    /// Writes what is pending, then closes the pipe (the bridge reads its end of input).
    pub(crate) fn close(&self) {
        lock(&self.shared.pending).closing = true;
        self.shared.ready.notify_one();
        if let Some(writer) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = writer.join();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn frames_arrive_in_order_and_closing_writes_the_rest() {
        let sink = Sink::default();
        let outbox = Outbox::new(sink.clone()).unwrap();
        for byte in 0..100u8 {
            outbox.send(|frames| frames.write_all(&[byte])).unwrap();
        }
        outbox.close();
        assert_eq!(*sink.0.lock().unwrap(), (0..100u8).collect::<Vec<_>>());
        assert!(outbox.send(|frames| frames.write_all(b"late")).is_err(), "a closed outbox refuses frames");
    }
}
