//! The flow runs in progress in this process, so that one can be cancelled from outside it:
//! by a Prefect server whose UI cancelled it, or by the program itself.

use std::sync::{Arc, Mutex, Weak};

use uuid::Uuid;

use crate::context::FlowRunContext;

struct Live {
    id: Uuid,
    parent: Option<Uuid>,
    context: Weak<FlowRunContext>,
}

static LIVE: Mutex<Vec<Live>> = Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<Live>> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Keeps `context` findable by its run's id until [`forget`].
pub(super) fn register(context: &Arc<FlowRunContext>) {
    let Some(info) = &context.info else { return };
    let entry =
        Live { id: info.id, parent: info.parent.as_ref().map(|p| p.flow_run_id), context: Arc::downgrade(context) };
    let mut live = live();
    live.retain(|entry| entry.context.strong_count() > 0);
    live.push(entry);
}

/// The run has ended.
pub(super) fn forget(id: Uuid) {
    live().retain(|entry| entry.id != id);
}

/// The live flow run `id` and its subflow runs, and theirs.
fn family(id: Uuid) -> Vec<Arc<FlowRunContext>> {
    let live = live();
    let mut found: Vec<Arc<FlowRunContext>> = Vec::new();
    let mut ids = vec![id];
    let mut next = 0;
    // Breadth first over the parent links.
    while next < ids.len() {
        let parent = ids[next];
        next += 1;
        for entry in live.iter() {
            let wanted = entry.id == parent && next == 1 || entry.parent == Some(parent);
            if let Some(context) = entry.context.upgrade().filter(|_| wanted) {
                if entry.id != parent {
                    ids.push(entry.id);
                }
                found.push(context);
            }
        }
    }
    found
}

/// Cancels the flow run `id` of this process, and its subflow runs: each stops submitting,
/// its runner cancels its unfinished task runs, and it ends `Cancelled` with `reason` once
/// its function returns. Returns whether a run in progress had that id.
pub(crate) fn cancel(id: Uuid, reason: &str) -> bool {
    let found = family(id);
    for context in &found {
        let _span = context.span.enter();
        if context.cancel(reason) {
            tracing::warn!(target: "prefect::flow_run", "Cancelling: {reason}");
        }
    }
    !found.is_empty()
}

/// Pauses (or resumes) the flow run `id` of this process and its subflow runs: task runs
/// they submit while paused wait. Returns whether a run in progress had that id.
pub(crate) fn pause(id: Uuid, paused: bool, reason: &str) -> bool {
    let found = family(id);
    for context in &found {
        let _span = context.span.enter();
        match paused {
            true if context.pause() => tracing::warn!(target: "prefect::flow_run", "Paused: {reason}"),
            false if context.resume() => tracing::info!(target: "prefect::flow_run", "Resumed: {reason}"),
            _ => {}
        }
    }
    !found.is_empty()
}
