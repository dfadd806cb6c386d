//! How `produce` reads messages and `consume` prints them, in the habits of kcat: a key before a
//! separator (`-K`), headers as `key=value` (`-H`), JSON objects (the same shape `consume
//! --format json` prints, so that one's output is the other's input), or raw bytes.

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;

use crate::proto::v1 as pb;

use super::error::CliError;

/// A header from `--header key=value`.
pub fn parse_header(s: &str) -> Result<pb::Header, CliError> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| CliError::Usage(format!("--header {s:?} is not key=value")))?;
    Ok(pb::Header {
        key: key.to_string(),
        value: Bytes::copy_from_slice(value.as_bytes()),
    })
}

/// A text line as a message: with a separator, what precedes its first occurrence is the key
/// (a line without it has no key).
pub fn text_message(line: String, separator: Option<&str>) -> pb::Message {
    let (key, value) = match separator.and_then(|sep| line.split_once(sep)) {
        Some((k, v)) => (Some(Bytes::from(k.to_string())), v.to_string()),
        None => (None, line),
    };
    pb::Message {
        key,
        value: Some(Bytes::from(value)),
        ..pb::Message::default()
    }
}

/// A field of a JSON object as bytes: `name` as text or `name_base64`.
fn json_bytes(
    o: &serde_json::Map<String, serde_json::Value>,
    name: &str,
) -> Result<Option<Bytes>, String> {
    if let Some(v) = o.get(name).filter(|v| !v.is_null()) {
        let s = v
            .as_str()
            .ok_or_else(|| format!("{name} must be a string"))?;
        return Ok(Some(Bytes::from(s.to_string())));
    }
    let b64 = format!("{name}_base64");
    match o.get(&b64).and_then(|v| v.as_str()) {
        Some(s) => base64::engine::general_purpose::STANDARD
            .decode(s)
            .map(|b| Some(Bytes::from(b)))
            .map_err(|e| format!("{b64}: {e}")),
        None => Ok(None),
    }
}

/// A JSON line as a message: `key`/`key_base64`, `value`/`value_base64`, `headers` (an object
/// of strings) and `partition`; other fields (a consumed delivery's offset, time, …) are
/// ignored.
pub fn json_message(line: &str) -> Result<pb::Message, CliError> {
    let bad = |e: String| CliError::Usage(format!("not a message: {e}: {line}"));
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
    let o = v
        .as_object()
        .ok_or_else(|| bad("not a JSON object".into()))?;
    let mut headers = Vec::new();
    if let Some(h) = o.get("headers").and_then(|h| h.as_object()) {
        for (k, v) in h {
            let v = v
                .as_str()
                .ok_or_else(|| bad(format!("header {k} must be a string")))?;
            headers.push(pb::Header {
                key: k.clone(),
                value: Bytes::from(v.to_string()),
            });
        }
    }
    let partition = match o.get("partition") {
        None | Some(serde_json::Value::Null) => None,
        Some(p) => Some(
            p.as_u64()
                .and_then(|p| u32::try_from(p).ok())
                .ok_or_else(|| bad("partition must be a number".into()))?,
        ),
    };
    Ok(pb::Message {
        key: json_bytes(o, "key").map_err(bad)?,
        value: json_bytes(o, "value").map_err(bad)?,
        headers,
        partition,
        id: json_bytes(o, "id").map_err(bad)?,
    })
}

/// A delivery as a text line: `[headers SEP][key SEP]value`, headers as `k=v,k=v`.
pub fn text_line(d: &pb::Delivery, separator: Option<&str>, headers: bool) -> Vec<u8> {
    let sep = separator.unwrap_or("\t").as_bytes();
    let mut out = Vec::new();
    if headers {
        let list: Vec<String> = d
            .headers
            .iter()
            .map(|h| format!("{}={}", h.key, String::from_utf8_lossy(&h.value)))
            .collect();
        out.extend_from_slice(list.join(",").as_bytes());
        out.extend_from_slice(sep);
    }
    if separator.is_some() {
        out.extend_from_slice(d.key.as_deref().unwrap_or_default());
        out.extend_from_slice(sep);
    }
    out.extend_from_slice(d.value.as_deref().unwrap_or_default());
    out.push(b'\n');
    out
}

fn text_or_base64(b: &[u8]) -> (&'static str, serde_json::Value) {
    match std::str::from_utf8(b) {
        Ok(s) => ("", serde_json::Value::String(s.to_string())),
        Err(_) => (
            "_base64",
            serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(b)),
        ),
    }
}

/// One delivery as a JSON object: text fields as text, other bytes as `<field>_base64`.
pub fn delivery_json(d: &pb::Delivery) -> serde_json::Value {
    let mut o = serde_json::Map::new();
    o.insert("topic".into(), d.topic.clone().into());
    o.insert("partition".into(), d.partition.into());
    o.insert("offset".into(), d.offset.into());
    o.insert("timestamp_ms".into(), d.timestamp_ms.into());
    let time = std::time::UNIX_EPOCH + Duration::from_millis(d.timestamp_ms.max(0) as u64);
    o.insert(
        "time".into(),
        humantime::format_rfc3339_millis(time).to_string().into(),
    );
    for (name, field) in [("key", &d.key), ("value", &d.value)] {
        match field {
            None => {
                o.insert(name.into(), serde_json::Value::Null);
            }
            Some(b) => {
                let (suffix, v) = text_or_base64(b);
                o.insert(format!("{name}{suffix}"), v);
            }
        }
    }
    let headers: serde_json::Map<String, serde_json::Value> = d
        .headers
        .iter()
        .map(|h| {
            let (_, v) = text_or_base64(&h.value);
            (h.key.clone(), v)
        })
        .collect();
    o.insert("headers".into(), headers.into());
    if let Some(id) = &d.id {
        let (suffix, v) = text_or_base64(id);
        o.insert(format!("id{suffix}"), v);
    }
    if !d.ack_id.is_empty() {
        o.insert("attempt".into(), d.attempt.into());
    }
    serde_json::Value::Object(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_become_messages_as_kcat_users_expect() {
        let m = text_message("patient-7:answered".into(), Some(":"));
        assert_eq!(m.key.as_deref(), Some(&b"patient-7"[..]));
        assert_eq!(m.value.as_deref(), Some(&b"answered"[..]));
        let m = text_message("no separator here".into(), Some(":"));
        assert_eq!(
            (m.key, m.value.as_deref()),
            (None, Some(&b"no separator here"[..]))
        );
        let m = text_message("a:b:c".into(), Some(":"));
        assert_eq!(
            m.value.as_deref(),
            Some(&b"b:c"[..]),
            "split at the first one"
        );
        assert_eq!(parse_header("trial=T-1").unwrap().value.as_ref(), b"T-1");
        assert_eq!(parse_header("k=a=b").unwrap().value.as_ref(), b"a=b");
        assert!(parse_header("novalue").is_err());
    }

    #[test]
    fn json_lines_round_trip_what_consume_prints() {
        let d = pb::Delivery {
            topic: "t".into(),
            partition: 2,
            offset: 9,
            key: Some(Bytes::from_static(b"k")),
            value: Some(Bytes::from_static(&[0xff, 0x00, 0x7f])),
            headers: vec![pb::Header {
                key: "site".into(),
                value: Bytes::from_static(b"Basel"),
            }],
            ..pb::Delivery::default()
        };
        let line = delivery_json(&d).to_string();
        let m = json_message(&line).unwrap();
        assert_eq!(m.key, d.key);
        assert_eq!(m.value, d.value, "binary values travel as value_base64");
        assert_eq!(m.headers, d.headers);
        assert_eq!(m.partition, Some(2), "the same partition, as consumed");
        let m = json_message(r#"{"value":"v","partition":3}"#).unwrap();
        assert_eq!(m.partition, Some(3));
        for bad in ["[1]", "{\"value\":1}", "{\"value_base64\":\"%%\"}", "nope"] {
            assert!(json_message(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn deliveries_print_with_key_and_headers_on_request() {
        let d = pb::Delivery {
            key: Some(Bytes::from_static(b"k1")),
            value: Some(Bytes::from_static(b"v1")),
            headers: vec![pb::Header {
                key: "a".into(),
                value: Bytes::from_static(b"1"),
            }],
            ..pb::Delivery::default()
        };
        let cases = [
            (None, false, "v1\n"),
            (Some(":"), false, "k1:v1\n"),
            (None, true, "a=1\tv1\n"),
            (Some("|"), true, "a=1|k1|v1\n"),
        ];
        for (sep, headers, want) in cases {
            assert_eq!(
                String::from_utf8(text_line(&d, sep, headers)).unwrap(),
                want
            );
        }
    }
}
