//! The outbox's entry format: a version byte, then the message's headers, destination,
//! routing key, id, key and payload, each length-prefixed. A damaged or foreign entry is
//! refused, never misread.

use crate::message::{Message, MessageFormatError};

/// Format version of an encoded entry.
const VERSION: u8 = 1;

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn put_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => {
            out.push(1);
            put_bytes(out, s.as_bytes());
        }
        None => out.push(0),
    }
}

/// Encodes a message: version, wire headers (identity first), destination, routing key,
/// payload; lengths as little-endian u64.
pub(super) fn encode(msg: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.payload().len() + 128);
    out.push(VERSION);
    let headers = msg.wire_headers();
    out.extend_from_slice(&(headers.len() as u64).to_le_bytes());
    for (k, v) in &headers {
        put_bytes(&mut out, k.as_bytes());
        put_bytes(&mut out, v.as_bytes());
    }
    put_opt(&mut out, msg.destination());
    put_opt(&mut out, msg.routing_key());
    put_bytes(&mut out, msg.payload());
    out
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated entry".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn len(&mut self) -> Result<usize, String> {
        let raw: [u8; 8] = self
            .take(8)?
            .try_into()
            .map_err(|_| "truncated length".to_owned())?;
        usize::try_from(u64::from_le_bytes(raw)).map_err(|_| "length overflow".to_owned())
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.len()?;
        self.take(n)
    }
    fn text(&mut self) -> Result<&'a str, String> {
        std::str::from_utf8(self.bytes()?).map_err(|e| e.to_string())
    }
    fn opt(&mut self) -> Result<Option<&'a str>, String> {
        match self.take(1)?[0] {
            0 => Ok(None),
            1 => self.text().map(Some),
            t => Err(format!("bad option tag {t}")),
        }
    }
}

pub(super) fn decode(raw: &[u8]) -> Result<Message, String> {
    let mut r = Reader(raw);
    let version = r.take(1)?[0];
    if version != VERSION {
        return Err(format!("unknown entry version {version}"));
    }
    let n = r.len()?;
    let mut headers = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        headers.push((r.text()?, r.text()?));
    }
    let destination = r.opt()?;
    let routing_key = r.opt()?;
    let payload = r.bytes()?.to_vec();
    if !r.0.is_empty() {
        return Err("trailing bytes".into());
    }
    let mut msg =
        Message::from_wire(payload, headers).map_err(|e: MessageFormatError| e.to_string())?;
    if let Some(d) = destination {
        msg = msg.with_destination(d);
    }
    if let Some(k) = routing_key {
        msg = msg.with_routing_key(k);
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_with_every_field() {
        let msg = Message::new(&b"\x00payload\xff"[..])
            .with_idempotency_key("order-42")
            .unwrap()
            .with_header("trace", "abc")
            .with_destination("orders")
            .with_routing_key("eu");
        assert_eq!(decode(&encode(&msg)).unwrap(), msg);
        let bare = Message::new("x");
        assert_eq!(decode(&encode(&bare)).unwrap(), bare);
    }

    #[test]
    fn damaged_entries_are_refused_not_misread() {
        let raw = encode(&Message::new("hello").with_destination("q"));
        for cut in [0, 1, 5, raw.len() - 1] {
            assert!(decode(&raw[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = raw.clone();
        longer.push(0);
        assert!(decode(&longer).is_err());
        let mut other_version = raw;
        other_version[0] = 9;
        assert!(decode(&other_version).is_err());
    }
}
