//! What can go wrong talking to a Prefect server.

use std::time::Duration;

/// A failed request to a Prefect server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// No answer: the server is down, the address is wrong, or it took too long.
    #[error(
        "could not reach the Prefect server at {url}: {message}. Start it with `prefect server start`, or check PREFECT_API_URL"
    )]
    Unreachable {
        /// The address called.
        url: String,
        /// Why, from the HTTP stack.
        message: String,
    },
    /// The server answered with an error status.
    #[error("the Prefect server answered {status} to {method} {path}: {body}{hint}", hint = status_hint(*status))]
    Status {
        /// `GET` or `POST`.
        method: String,
        /// The API path, such as `/flow_runs/`.
        path: String,
        /// The HTTP status.
        status: u16,
        /// The start of the answer's body.
        body: String,
        /// How long the server asked the client to wait, with a `Retry-After` header.
        retry_after: Option<Duration>,
    },
    /// A body could not be turned into JSON.
    #[error("could not encode the body for {path}: {message}")]
    Encode {
        /// The API path.
        path: String,
        /// Why.
        message: String,
    },
    /// The server's answer is not what this client expects of Prefect 3.
    #[error(
        "the answer to {path} is not what a Prefect 3 server sends ({message}); is PREFECT_API_URL a Prefect 3 API?"
    )]
    Decode {
        /// The API path.
        path: String,
        /// Why.
        message: String,
    },
}

fn status_hint(status: u16) -> &'static str {
    match status {
        401 | 403 => ". Check PREFECT_API_KEY",
        404 => ". Check that PREFECT_API_URL ends in /api",
        _ => "",
    }
}

impl ApiError {
    /// Whether trying again later may work: no answer, or the server said it is busy
    /// (408, 429, 502, 503, 504), as Prefect's own client decides.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Status { status, .. } => matches!(status, 408 | 429 | 502 | 503 | 504),
            _ => false,
        }
    }

    /// How long the server asked to wait before trying again.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}
