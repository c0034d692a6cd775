//! How one attempt of a flow function runs: on the calling thread, on a thread of its own
//! with a timeout, or as a future. The retry loop in [`drive`](super::drive) is the same for
//! all three.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, mpsc};
use std::task::{Context, Poll};
use std::time::Duration;

use super::AttemptFailure;
use crate::context::{self, FlowRunContext, WithContext};
use crate::panic::{InTask, catch_panic, panic_message};
use crate::task_engine;

/// One kind of flow function: how an attempt runs, how to wait for its task runs, and how
/// to wait between attempts without blocking what must not be blocked.
pub(super) trait Attempts<R> {
    /// Runs the function once, with the flow run's context current.
    fn attempt(&mut self, context: &Arc<FlowRunContext>) -> impl Future<Output = Result<R, AttemptFailure>>;

    /// Waits until every task run submitted so far has finished.
    fn wait_idle(&self, context: &Arc<FlowRunContext>) -> impl Future<Output = ()>;

    /// Waits `delay` before the next attempt.
    fn pause(&self, delay: Duration) -> impl Future<Output = ()>;
}

fn flow_panic(panic: String) -> String {
    format!("Flow run panicked: {panic}")
}

/// A sync function without a timeout: it runs on the calling thread.
pub(super) struct SyncAttempts<B>(pub(super) B);

impl<R, B: FnMut() -> Result<R, String>> Attempts<R> for SyncAttempts<B> {
    async fn attempt(&mut self, context: &Arc<FlowRunContext>) -> Result<R, AttemptFailure> {
        let _entered = context::enter(context.clone());
        let _span = (*context.span).clone().entered();
        catch_panic(&mut self.0).unwrap_or_else(|panic| Err(flow_panic(panic))).map_err(AttemptFailure::Failed)
    }

    async fn wait_idle(&self, context: &Arc<FlowRunContext>) {
        context.tracker.wait_idle();
    }

    async fn pause(&self, delay: Duration) {
        std::thread::sleep(delay);
    }
}

/// A sync function with a timeout: each attempt runs on a thread of its own, abandoned when
/// it overruns (Rust cannot stop a thread; it runs on until its code returns, but the flow
/// run fails at once, and the task runs not started yet are cancelled).
pub(super) struct TimedAttempts<B> {
    body: Arc<Mutex<B>>,
    limit: Option<Duration>,
}

impl<B> TimedAttempts<B> {
    pub(super) fn new(body: B, limit: Option<Duration>) -> Self {
        Self { body: Arc::new(Mutex::new(body)), limit }
    }
}

impl<R, B> Attempts<R> for TimedAttempts<B>
where
    R: Send + 'static,
    B: FnMut() -> Result<R, String> + Send + 'static,
{
    async fn attempt(&mut self, context: &Arc<FlowRunContext>) -> Result<R, AttemptFailure> {
        let (sender, receiver) = mpsc::channel();
        let (thread_context, body) = (context.clone(), self.body.clone());
        let spawned = std::thread::Builder::new().name("prefect-flow".into()).spawn(move || {
            let _entered = context::enter(thread_context.clone());
            let _span = (*thread_context.span).clone().entered();
            let mut body = body.lock().unwrap_or_else(|p| p.into_inner());
            let _ = sender.send(catch_panic(&mut *body).unwrap_or_else(|panic| Err(flow_panic(panic))));
        });
        if let Err(error) = spawned {
            return Err(AttemptFailure::Failed(format!("could not start a thread for the flow: {error}")));
        }
        let outcome = match self.limit {
            None => receiver.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
            Some(limit) => receiver.recv_timeout(limit),
        };
        match (outcome, self.limit) {
            (Ok(outcome), _) => outcome.map_err(AttemptFailure::Failed),
            (Err(mpsc::RecvTimeoutError::Timeout), Some(limit)) => {
                context.runner.cancel_pending("the flow run timed out");
                Err(AttemptFailure::TimedOut(limit))
            }
            (Err(_), _) => Err(AttemptFailure::Failed("the flow's thread ended without a result".to_owned())),
        }
    }

    async fn wait_idle(&self, context: &Arc<FlowRunContext>) {
        context.tracker.wait_idle();
    }

    async fn pause(&self, delay: Duration) {
        std::thread::sleep(delay);
    }
}

/// An async function: each attempt is a future, dropped when it overruns its timeout.
pub(super) struct AsyncAttempts<B> {
    pub(super) body: B,
    pub(super) limit: Option<Duration>,
}

impl<R, F, B> Attempts<R> for AsyncAttempts<B>
where
    B: FnMut() -> F,
    F: Future<Output = Result<R, String>>,
{
    async fn attempt(&mut self, context: &Arc<FlowRunContext>) -> Result<R, AttemptFailure> {
        let attempt = WithContext { context: context.clone(), future: Box::pin(CatchUnwind(Box::pin((self.body)()))) };
        let Some(limit) = self.limit else {
            return attempt.await.map_err(AttemptFailure::Failed);
        };
        let timer = task_engine::runtime().spawn(tokio::time::sleep(limit));
        match (Deadline { future: attempt, timer }).await {
            Some(outcome) => outcome.map_err(AttemptFailure::Failed),
            None => {
                context.runner.cancel_pending("the flow run timed out");
                Err(AttemptFailure::TimedOut(limit))
            }
        }
    }

    async fn wait_idle(&self, context: &Arc<FlowRunContext>) {
        context.tracker.wait_idle_async().await;
    }

    async fn pause(&self, delay: Duration) {
        let _ = task_engine::runtime().spawn(tokio::time::sleep(delay)).await;
    }
}

/// Turns a panic while polling into the flow's failure message.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<R, F: Future<Output = Result<R, String>>> Future for CatchUnwind<F> {
    type Output = Result<R, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let future = self.0.as_mut();
        let polled = {
            let _in_task = InTask::enter();
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || future.poll(cx)))
        };
        match polled {
            Ok(poll) => poll,
            Err(payload) => Poll::Ready(Err(flow_panic(panic_message(payload)))),
        }
    }
}

/// Resolves to `None` if the timer finishes first.
struct Deadline<F> {
    future: F,
    timer: tokio::task::JoinHandle<()>,
}

impl<F: Future + Unpin> Future for Deadline<F> {
    type Output = Option<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Poll::Ready(output) = Pin::new(&mut self.future).poll(cx) {
            return Poll::Ready(Some(output));
        }
        match Pin::new(&mut self.timer).poll(cx) {
            Poll::Ready(_) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}
