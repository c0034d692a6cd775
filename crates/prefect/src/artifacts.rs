//! Artifacts: markdown, tables and links that a run publishes to the Prefect UI.
//!
//! Each function mirrors Python Prefect's `create_*_artifact`. Inside a task run or flow run
//! the artifact belongs to that run; with a `key`, the UI also keeps it under the key across
//! runs (the Artifacts page shows its history). On Ray the artifact travels with the run's
//! report to the program, which sends it to the server: workers need no route to the server.
//! Without a server (`PREFECT_API_URL` unset) the artifact is only logged.
//!
//! A progress artifact is kept for each task run that calls [`crate::progress`].
//!
//! # Examples
//!
//! ```
//! use prefect::artifacts::{create_link_artifact, create_markdown_artifact, create_table_artifact};
//! use serde_json::json;
//!
//! #[prefect::task]
//! fn report(rows: u32) -> u32 {
//!     create_markdown_artifact("# Nightly\nAll rows loaded.", Some("nightly-report"), None).unwrap();
//!     create_table_artifact(&json!([{"table": "users", "rows": rows}]), None, Some("Rows per table")).unwrap();
//!     create_link_artifact("https://example.com/dashboard", Some("Dashboard"), None, None).unwrap();
//!     rows
//! }
//!
//! #[prefect::flow]
//! fn nightly() -> u32 {
//!     report.submit(12).result().unwrap()
//! }
//!
//! assert_eq!(nightly().unwrap(), 12);
//! ```

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The target of the events that carry artifacts (in the field [`ARTIFACT_FIELD`], as JSON).
pub const ARTIFACT_TARGET: &str = "prefect::artifact";

/// The field of an artifact's event that holds its JSON; log lines leave it out.
pub const ARTIFACT_FIELD: &str = "artifact";

/// An artifact as Prefect's API takes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Artifact {
    /// `markdown` or `table` (a link is markdown).
    #[serde(rename = "type")]
    pub kind: String,
    /// The key it is kept under across runs, if any.
    pub key: Option<String>,
    /// Markdown text, or a table as JSON text.
    pub data: String,
    /// A markdown description.
    pub description: Option<String>,
}

/// Why an artifact was not created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArtifactError {
    /// Prefect accepts keys of lowercase letters, numbers and dashes.
    #[error(
        "artifact key '{0}' is not valid; use only lowercase letters, numbers and dashes, such as 'nightly-report'"
    )]
    Key(String),
    /// The table did not serialize to JSON.
    #[error("the table cannot be written as JSON: {0}; give rows (a list of maps) or columns (a map of lists)")]
    Table(#[source] serde_json::Error),
}

/// Publishes a markdown artifact.
///
/// # Errors
///
/// If `key` has characters Prefect refuses.
pub fn create_markdown_artifact(
    markdown: &str,
    key: Option<&str>,
    description: Option<&str>,
) -> Result<Artifact, ArtifactError> {
    publish("markdown", markdown.to_owned(), key, description)
}

/// Publishes a table artifact: rows (a list of maps, or of lists) or columns (a map of
/// lists), as anything that serializes so. NaN and infinite numbers show as empty cells.
///
/// # Errors
///
/// If `key` has characters Prefect refuses, or the table does not serialize.
pub fn create_table_artifact<T: Serialize + ?Sized>(
    table: &T,
    key: Option<&str>,
    description: Option<&str>,
) -> Result<Artifact, ArtifactError> {
    let json: Value = serde_json::to_value(table).map_err(ArtifactError::Table)?;
    publish("table", json.to_string(), key, description)
}

/// Publishes a link artifact, shown as `[link_text](link)`.
///
/// # Errors
///
/// If `key` has characters Prefect refuses.
pub fn create_link_artifact(
    link: &str,
    link_text: Option<&str>,
    key: Option<&str>,
    description: Option<&str>,
) -> Result<Artifact, ArtifactError> {
    let markdown = format!("[{}]({link})", link_text.unwrap_or(link));
    publish("markdown", markdown, key, description)
}

fn publish(kind: &str, data: String, key: Option<&str>, description: Option<&str>) -> Result<Artifact, ArtifactError> {
    if let Some(key) = key.filter(|key| !valid_key(key)) {
        return Err(ArtifactError::Key(key.to_owned()));
    }
    let artifact = Artifact {
        kind: kind.to_owned(),
        key: key.map(str::to_owned),
        data,
        description: description.map(str::to_owned),
    };
    emit(&artifact);
    Ok(artifact)
}

/// Sends `artifact` the way every artifact goes: as an event in the current run's span,
/// which the program reports (and an executor records for the program).
pub fn emit(artifact: &Artifact) {
    let json = serde_json::to_string(artifact).expect("an artifact always serializes");
    let name = artifact.key.as_deref().map(|key| format!(" '{key}'")).unwrap_or_default();
    tracing::info!(target: ARTIFACT_TARGET, artifact = json.as_str(), "Created {} artifact{name}", artifact.kind);
}

/// The artifact an event carries, if it is one.
pub fn artifact_of(event: &tracing::Event<'_>) -> Option<Artifact> {
    if event.metadata().target() != ARTIFACT_TARGET {
        return None;
    }
    struct Json(Option<String>);
    impl tracing::field::Visit for Json {
        fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
            if field.name() == ARTIFACT_FIELD {
                self.0 = Some(value.to_owned());
            }
        }
        fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
    }
    let mut json = Json(None);
    event.record(&mut json);
    serde_json::from_str(&json.0?).ok()
}

/// Prefect's rule for keys: lowercase letters, numbers and dashes.
fn valid_key(key: &str) -> bool {
    !key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_prefects_rule() {
        assert!(valid_key("nightly-report-2"));
        for bad in ["Nightly", "nightly_report", "", "a b"] {
            assert!(matches!(create_markdown_artifact("x", Some(bad), None), Err(ArtifactError::Key(_))), "{bad}");
        }
    }

    #[test]
    fn links_are_markdown_and_tables_json() {
        let link = create_link_artifact("https://example.com", None, None, None).unwrap();
        assert_eq!(
            (link.kind.as_str(), link.data.as_str()),
            ("markdown", "[https://example.com](https://example.com)")
        );
        let table = create_table_artifact(&[[1, 2], [3, 4]], Some("grid"), None).unwrap();
        assert_eq!((table.kind.as_str(), table.data.as_str()), ("table", "[[1,2],[3,4]]"));
    }
}
