//! The bridge's first exchange: the program sends its configuration, the bridge connects
//! to Ray and answers `ready` or `fatal`. A bridge that does not connect is ended here,
//! with everything it started, and its answer becomes a [`RayError`].

use std::io::{BufReader, BufWriter, Write};
use std::process::{ChildStdin, ChildStdout};
use std::sync::mpsc;

use super::BridgeConfig;
use super::launch::{Launched, kill_group};
use crate::error::RayError;
use crate::protocol::frame::{read_message, write_message_named};
use crate::protocol::{ClusterInfo, Config, EXIT_NO_RAY, Fatal, FatalKind, Reply};
use crate::python;

/// A bridge that connected, with its pipes.
pub(super) struct Connected {
    pub(super) info: ClusterInfo,
    pub(super) commands: ChildStdin,
    pub(super) replies: BufReader<ChildStdout>,
    pub(super) launched: Launched,
}

/// Sends the configuration and waits, at most `config.connect_timeout`, for the answer.
pub(super) fn handshake(mut launched: Launched, config: &BridgeConfig) -> Result<Connected, RayError> {
    let message = Config {
        address: config.address.clone(),
        init_kwargs: config.init_kwargs.clone(),
        temp_dir: launched.temp_dir.path().join("ray").to_string_lossy().into_owned(),
        worker_package: launched.package.to_string_lossy().into_owned(),
        own_dir: launched.temp_dir.path().to_string_lossy().into_owned(),
        executor: launched.executor.clone(),
        max_batch: u32::try_from(config.max_batch).unwrap_or(u32::MAX),
    };
    let mut commands = BufWriter::new(launched.child.stdin.take().expect("piped"));
    let sent = write_message_named(&mut commands, &message).and_then(|()| commands.flush());

    let (answer_sender, answer) = mpsc::channel();
    let mut replies = BufReader::with_capacity(1 << 16, launched.child.stdout.take().expect("piped"));
    let output = launched.stderr.output.clone();
    let reader = std::thread::spawn(move || {
        // Log records may come first (Ray logs while it connects); the answer ends the loop.
        let answer = loop {
            match read_message::<Reply>(&mut replies) {
                Ok(Some(Reply::Log(record))) => output.log(record),
                other => break other,
            }
        };
        let _ = answer_sender.send(answer);
        replies
    });
    // A bridge that exits at once (no Ray) may refuse the configuration; its exit status
    // says why, so wait for its end of the pipe either way.
    let _ = sent;
    let answer = answer.recv_timeout(config.connect_timeout).ok();
    let target = config.address.clone().unwrap_or_else(|| "a temporary local instance".to_owned());
    if let Some(Ok(Some(Reply::Ready(info)))) = answer {
        let replies = reader.join().expect("the handshake thread does not panic");
        let commands = commands.into_inner().map_err(|error| RayError::Setup {
            what: "could not write to the Ray bridge".into(),
            source: error.into_error(),
        })?;
        return Ok(Connected { info, commands, replies, launched });
    }
    // The bridge is of no use: end it and everything it started.
    drop(commands);
    let exited = launched.child.try_wait().ok().flatten();
    kill_group(launched.child.id());
    let status = exited.or_else(|| launched.child.wait().ok());
    let Launched { python, stderr, .. } = launched;
    let cause = stderr.finish();
    Err(match answer {
        Some(Ok(Some(Reply::Fatal(fatal)))) => fatal_error(fatal, target),
        None => RayError::Timeout { target, after: config.connect_timeout },
        _ if status.and_then(|status| status.code()) == Some(EXIT_NO_RAY) => {
            RayError::NoRay { hint: python::install_hint(&python), python }
        }
        _ => RayError::BridgeExited {
            target,
            python,
            cause: cause.unwrap_or_else(|| {
                format!("no word; exit status {}", status.map_or("unknown".into(), |s| s.to_string()))
            }),
        },
    })
}

fn fatal_error(fatal: Fatal, target: String) -> RayError {
    let Fatal { kind, message, details } = fatal;
    if !details.is_empty() {
        tracing::debug!(target: "prefect_ray", "the Ray bridge could not connect:\n{details}");
    }
    match kind {
        FatalKind::InvalidAddress => RayError::InvalidAddress { address: target, reason: message },
        FatalKind::Unreachable => RayError::Unreachable { address: target, message },
        FatalKind::TokenRefused => RayError::TokenRefused { address: target },
        FatalKind::VersionMismatch => RayError::VersionMismatch { address: target, message },
        FatalKind::InitFailed => RayError::Connect { target, message },
    }
}
