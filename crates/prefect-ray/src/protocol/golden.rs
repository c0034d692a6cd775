//! Golden fixtures: the bytes of every message kind, checked here and by the Python side's
//! tests (python/tests/test_protocol.py), so the two sides cannot drift apart unnoticed.
//!
//! `PREFECT_RAY_BLESS=1 cargo test -p prefect-ray golden` writes the fixtures anew from the
//! values below; the Python test builds the same values itself and compares.

use std::path::PathBuf;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_bytes::ByteBuf;
use serde_json::json;

use super::frame::{write_frame, write_parts};
use super::*;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/protocol/fixtures").join(name)
}

/// Checks that `value` encodes to the fixture's bytes and the bytes decode to `value`.
fn golden<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(name: &str, value: &T, named: bool) {
    let encoded = if named { rmp_serde::to_vec_named(value) } else { rmp_serde::to_vec(value) }.unwrap();
    check_bytes(name, &encoded);
    let decoded: T = rmp_serde::from_slice(&encoded).unwrap();
    assert_eq!(&decoded, value, "{name} decodes to what was encoded");
}

fn check_bytes(name: &str, bytes: &[u8]) {
    let path = fixture(name);
    if std::env::var_os("PREFECT_RAY_BLESS").is_some() {
        std::fs::write(&path, bytes).unwrap();
    }
    let expected = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(bytes, expected, "{name} as the Rust side encodes it differs from the fixture");
}

fn call(bytes: &[u8]) -> ByteBuf {
    ByteBuf::from(bytes.to_vec())
}

#[test]
fn golden_config() {
    let config = Config {
        address: Some("ray://127.0.0.1:10001".into()),
        init_kwargs: json!({"num_cpus": 2, "namespace": "prefect"}).as_object().unwrap().clone(),
        temp_dir: "/tmp/prefect-ray-x/ray".into(),
        worker_package: "/tmp/prefect-ray-x/modules/prefect_ray_worker".into(),
        own_dir: "/tmp/prefect-ray-x".into(),
        executor: format!("{SHIPPED_PREFIX}count_to"),
        max_batch: 64,
    };
    golden("config.msgpack", &config, true);
}

#[test]
fn golden_commands() {
    let commands = [
        (
            "define",
            Command::Define(Define {
                function: 3,
                task_name: "shout".into(),
                options_json: r#"{"num_cpus":2}"#.into(),
            }),
        ),
        (
            "submit",
            Command::Submit(Submit {
                key: 70_000,
                function: 3,
                call: call(&[ONE_RUN, 0x81, 0xa1, b'a', 0x01]),
                value_keys: vec![1, 300],
                report_keys: vec![5],
            }),
        ),
        (
            "submit_batch",
            Command::SubmitBatch(SubmitBatch {
                keys: vec![8, 9],
                function: 1,
                call: call(&[MANY_RUNS, 0x92, 0xc4, 0x01, 0x80, 0xc4, 0x01, 0x80]),
                dependencies: vec![
                    Dependencies { value_keys: vec![2], report_keys: vec![] },
                    Dependencies { value_keys: vec![], report_keys: vec![3, 4] },
                ],
            }),
        ),
        ("get", Command::Get(Get { request: 12, key: 8 })),
        ("release", Command::Release(Release { keys: vec![1, 2, 4_294_967_296] })),
        ("cancel", Command::Cancel(Cancel { key: 9 })),
        ("stats", Command::Stats(Stats { request: 13 })),
        ("shutdown", Command::Shutdown),
    ];
    for (name, command) in &commands {
        golden(&format!("command_{name}.msgpack"), command, false);
    }
}

#[test]
fn golden_replies() {
    let replies = [
        (
            "ready",
            Reply::Ready(ClusterInfo {
                nodes: 2,
                cpus: 3.0,
                dashboard_url: "127.0.0.1:8265".into(),
                ray_version: "2.60.0".into(),
                started_local: false,
            }),
        ),
        (
            "fatal",
            Reply::Fatal(Fatal {
                kind: FatalKind::TokenRefused,
                message: "the cluster refused this driver's authentication token".into(),
                details: "Traceback (most recent call last): ...".into(),
            }),
        ),
        (
            "died",
            Reply::Died(Died {
                message: "BufferFull: the command was larger than the buffer".into(),
                details: "Traceback (most recent call last): ...".into(),
            }),
        ),
        (
            "log",
            Reply::Log(LogRecord {
                level: LogLevel::Warning,
                target: "ray.worker".into(),
                message: "a warning from Ray".into(),
            }),
        ),
        (
            "live",
            Reply::Live(Live {
                lines: vec![
                    LiveLine {
                        run: "0".repeat(31) + "1",
                        pid: 4321,
                        seq: None,
                        micros: 1_800_000_000_000_000,
                        stream: String::new(),
                        text: String::new(),
                    },
                    LiveLine {
                        run: "0".repeat(31) + "1",
                        pid: 4321,
                        seq: Some(0),
                        micros: 1_800_000_000_000_001,
                        stream: "o".into(),
                        text: "training epoch 1".into(),
                    },
                ],
            }),
        ),
        ("done", Reply::Done(Done { key: 70_000, report: call(&[COMPLETED, 1, 0, 0, 0, 0x90]) })),
        (
            "batch_done",
            Reply::BatchDone(BatchDone { keys: vec![8, 9], reports: call(&[0x92, 0xc4, 0x00, 0xc4, 0x00]) }),
        ),
        (
            "failed",
            Reply::Failed(Failed {
                key: 9,
                kind: FailureKind::Cancelled,
                message: "the task was cancelled in Ray".into(),
            }),
        ),
        ("value", Reply::Value(ValueReply { request: 12, blob: call(&[COMPLETED, 0x2a]) })),
        ("value_error", Reply::ValueError(NoValue { request: 12, message: "the value was already released".into() })),
        (
            "stats",
            Reply::Stats(StatsReply {
                request: 13,
                stats: BridgeStats {
                    peak_rss_bytes: 123_456_789,
                    objects: 4,
                    bridge_pid: 4321,
                    namespace: "prefect".into(),
                    ray_tasks: 17,
                },
            }),
        ),
        ("bye", Reply::Bye),
    ];
    for (name, reply) in &replies {
        golden(&format!("reply_{name}.msgpack"), reply, false);
    }
    let mut framed = Vec::new();
    write_frame(&mut framed, &rmp_serde::to_vec(&Reply::Bye).unwrap()).unwrap();
    check_bytes("reply_bye.frame", &framed);
}

#[test]
fn golden_parts_frames() {
    let path = "/dev/shm/prefect-ray-1-0";
    let in_file = [&[IN_FILE][..], path.as_bytes()].concat();
    let mut call_frame = Vec::new();
    write_parts(&mut call_frame, &[&[&[ONE_RUN], b"header"], &[&in_file], &[&[COMPLETED, 0x2a]]]).unwrap();
    check_bytes("executor_call.parts", &call_frame);
    let mut reply_frame = Vec::new();
    write_parts(&mut reply_frame, &[&[b"report"], &[&[COMPLETED, 0x07]], &[RESTART]]).unwrap();
    check_bytes("executor_reply.parts", &reply_frame);
}
