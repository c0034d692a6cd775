//! Panics inside task and flow code: caught, and turned into the run's failure message
//! (with the panic's location) instead of a trace on stderr.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

use crate::error::TaskFailure;

thread_local! {
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Routes panics inside tasks to the task run's state instead of stderr; other panics go
/// to the hook that was installed before.
pub(crate) fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if IN_TASK.with(Cell::get) {
                let message = payload_message(info.payload());
                let located = match info.location() {
                    Some(at) => {
                        format!("{message} (at {}:{}:{})", at.file(), at.line(), at.column())
                    }
                    None => message,
                };
                LAST_PANIC.with(|last| *last.borrow_mut() = Some(located));
            } else {
                previous(info);
            }
        }));
    });
}

/// Marks this thread as running task code until dropped, also when a panic unwinds.
pub(crate) struct InTask(bool);

impl InTask {
    pub(crate) fn enter() -> Self {
        Self(IN_TASK.with(|flag| flag.replace(true)))
    }
}

impl Drop for InTask {
    fn drop(&mut self) {
        IN_TASK.with(|flag| flag.set(self.0));
    }
}

pub(crate) fn catch_task_panic(body: impl FnOnce() -> Result<Vec<u8>, TaskFailure>) -> Result<Vec<u8>, TaskFailure> {
    catch_panic(body).unwrap_or_else(|message| Err(TaskFailure::retryable(format!("Task run panicked: {message}"))))
}

/// Runs `body`, turning a panic into its message and location instead of printing it.
pub(crate) fn catch_panic<T>(body: impl FnOnce() -> T) -> Result<T, String> {
    install_panic_hook();
    let outcome = {
        let _in_task = InTask::enter();
        panic::catch_unwind(AssertUnwindSafe(body))
    };
    outcome.map_err(panic_message)
}

/// The message of a panic caught on this thread, with its location when the hook saw it.
pub(crate) fn panic_message(payload: Box<dyn Any + Send>) -> String {
    LAST_PANIC.with(|last| last.borrow_mut().take()).unwrap_or_else(|| payload_message(payload.as_ref()))
}

pub(crate) fn panic_failure(payload: Box<dyn Any + Send>) -> TaskFailure {
    TaskFailure::retryable(format!("Task run panicked: {}", panic_message(payload)))
}

fn payload_message(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic with a non-text payload".to_owned()
    }
}

/// Marks the thread as running task code while the future is polled, so the panic hook
/// attributes a panic to the task.
pub(crate) struct PanicAware<F>(pub(crate) F);

impl<F: std::future::Future + Unpin> std::future::Future for PanicAware<F> {
    type Output = F::Output;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        let _in_task = InTask::enter();
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}
