//! Prefect's result-record layout: the JSON file a persisted value lives in.
//!
//! A record is `{"metadata": {...}, "result": "..."}`. With Prefect's JSON serializer the
//! result is the value's JSON text, so Python Prefect reads a Rust task's value with
//! `ResultRecord.deserialize`. A value JSON cannot carry exactly (bytes, maps with
//! non-string keys, `f32`, NaN) is kept as base64 MessagePack under a serializer type of our
//! own, which Python Prefect loads as metadata only.

use base64::Engine;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The serializer type of values kept as MessagePack.
pub(crate) const MSGPACK: &str = "prefect-rust-msgpack";

/// The Prefect version whose layout records follow.
const PREFECT_VERSION: &str = "3.9.1";

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    metadata: Metadata,
    result: String,
}

/// Prefect's `ResultRecordMetadata`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Metadata {
    pub(crate) storage_key: Option<String>,
    pub(crate) expiration: Option<DateTime<Utc>>,
    pub(crate) serializer: Value,
    pub(crate) prefect_version: String,
    pub(crate) storage_block_id: Option<String>,
}

impl Metadata {
    /// The serializer's type: `json`, or ours.
    pub(crate) fn serializer_type(&self) -> &str {
        self.serializer.get("type").and_then(Value::as_str).unwrap_or_default()
    }

    /// The metadata as a JSON value: what a state's `data` holds on the server.
    pub(crate) fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// Prefect's JSON serializer, as Python Prefect writes it.
fn json_serializer() -> Value {
    json!({
        "type": "json",
        "jsonlib": "json",
        "object_encoder": "prefect.serializers.prefect_json_object_encoder",
        "object_decoder": "prefect.serializers.prefect_json_object_decoder",
        "dumps_kwargs": {},
        "loads_kwargs": {},
    })
}

/// The record of `value` (MessagePack, as tasks produce it), and its metadata.
pub(crate) fn encode(value: &[u8], storage_key: &str, expiration: Option<DateTime<Utc>>) -> (Vec<u8>, Metadata) {
    let (serializer, result) = match as_json(value) {
        Some(text) => (json_serializer(), text),
        None => (json!({"type": MSGPACK}), base64::engine::general_purpose::STANDARD.encode(value)),
    };
    let metadata = Metadata {
        storage_key: Some(storage_key.to_owned()),
        expiration,
        serializer,
        prefect_version: PREFECT_VERSION.to_owned(),
        storage_block_id: None,
    };
    let record = Record { metadata, result };
    let bytes = serde_json::to_vec(&record).expect("a record always serializes");
    (bytes, record.metadata)
}

/// Why a stored record could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The file is not a result record.
    #[error("not a result record: {0}")]
    Layout(#[source] serde_json::Error),
    /// The record's value does not read with its serializer.
    #[error("the record's value does not read as {serializer}: {message}")]
    Value {
        /// The serializer the record names.
        serializer: String,
        /// What went wrong.
        message: String,
    },
}

/// The value (MessagePack) and metadata of a stored record.
pub(crate) fn decode(bytes: &[u8]) -> Result<(Vec<u8>, Metadata), RecordError> {
    let record: Record = serde_json::from_slice(bytes).map_err(RecordError::Layout)?;
    let serializer = record.metadata.serializer_type().to_owned();
    let failed = |message: String| RecordError::Value { serializer: serializer.clone(), message };
    let value = match serializer.as_str() {
        "json" => from_json(&record.result).map_err(failed)?,
        MSGPACK => {
            base64::engine::general_purpose::STANDARD.decode(&record.result).map_err(|e| failed(e.to_string()))?
        }
        other => return Err(failed(format!("'{other}' is not a serializer this program reads"))),
    };
    Ok((value, record.metadata))
}

/// `value` as JSON text, if JSON carries it exactly: read back, it is the same MessagePack.
/// Transcoding keeps maps (and so struct fields) in their order.
fn as_json(value: &[u8]) -> Option<String> {
    let mut text = Vec::new();
    let mut reader = rmp_serde::Deserializer::from_read_ref(value);
    serde_transcode::transcode(&mut reader, &mut serde_json::Serializer::new(&mut text)).ok()?;
    let text = String::from_utf8(text).ok()?;
    (from_json(&text).ok()? == value).then_some(text)
}

/// JSON text as the MessagePack a task's value decodes from.
fn from_json(text: &str) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    let mut reader = serde_json::Deserializer::from_str(text);
    serde_transcode::transcode(&mut reader, &mut rmp_serde::Serializer::new(&mut bytes)).map_err(|e| e.to_string())?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_bytes::ByteBuf;

    use super::*;

    #[derive(Serialize)]
    struct Reading {
        city: String,
        degrees: f64,
        days: Vec<u32>,
    }

    #[test]
    fn json_values_are_kept_as_prefects_json_serializer_writes_them() {
        let value =
            rmp_serde::to_vec_named(&Reading { city: "Lyon".into(), degrees: 21.5, days: vec![1, 300] }).unwrap();
        let (bytes, metadata) = encode(&value, "/results/key", None);
        assert_eq!(metadata.serializer_type(), "json");
        let record: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(record["result"], r#"{"city":"Lyon","degrees":21.5,"days":[1,300]}"#);
        assert_eq!(record["metadata"]["storage_key"], "/results/key");
        let (back, _) = decode(&bytes).unwrap();
        assert_eq!(back, value);
    }

    #[test]
    fn values_json_cannot_carry_are_kept_as_msgpack() {
        let cases = [
            rmp_serde::to_vec_named(&ByteBuf::from(vec![0u8, 255])).unwrap(),
            rmp_serde::to_vec_named(&BTreeMap::from([(1u8, "a")])).unwrap(),
            rmp_serde::to_vec_named(&1.5f32).unwrap(),
            rmp_serde::to_vec_named(&f64::NAN).unwrap(),
        ];
        for value in cases {
            let (bytes, metadata) = encode(&value, "k", None);
            assert_eq!(metadata.serializer_type(), MSGPACK);
            assert_eq!(decode(&bytes).unwrap().0, value);
        }
    }

    #[test]
    fn what_is_not_a_record_says_so() {
        assert!(matches!(decode(b"{}"), Err(RecordError::Layout(_))));
        let odd = br#"{"metadata":{"storage_key":null,"expiration":null,"serializer":{"type":"pickle"},"prefect_version":"3","storage_block_id":null},"result":"x"}"#;
        assert!(matches!(decode(odd), Err(RecordError::Value { .. })));
    }
}
