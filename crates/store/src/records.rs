//! Binary encodings of what the store keeps in redb and ships in snapshots: key records, change
//! records (the watch history) and the snapshot stream.
//!
//! These layouts are part of the on-disk format (see `FORMAT_VERSION` in `storage.rs`): change
//! one only together with a format version bump and a `data-change:` commit. Decoding never
//! panics on bad bytes; it returns [`RecordError`].

use crate::kv::{KeyValue, WatchEvent};

/// The first bytes of every snapshot stream.
pub(crate) const SNAPSHOT_MAGIC: &[u8; 24] = b"NOVACRON-STORE-SNAPSHOT\n";
/// Version of the snapshot stream layout.
pub(crate) const SNAPSHOT_LAYOUT_VERSION: u64 = 1;

const CHANGE_PUT: u8 = 1;
const CHANGE_DELETE: u8 = 2;

/// A record that could not be decoded.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecordError {
    #[error("record truncated while reading {field}")]
    Truncated { field: &'static str },
    #[error("record has an unknown change kind {kind}")]
    UnknownChangeKind { kind: u8 },
    #[error("key in record is not valid utf-8")]
    KeyNotUtf8,
    #[error("snapshot does not start with the novacron snapshot magic bytes")]
    NotASnapshot,
    #[error("snapshot layout version {found} is newer than supported {supported}")]
    SnapshotLayout { found: u64, supported: u64 },
}

/// A key's stored record: the value with its revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyRecord<'a> {
    pub create_revision: u64,
    pub mod_revision: u64,
    pub version: u64,
    pub value: &'a [u8],
}

impl KeyRecord<'_> {
    pub fn to_key_value(&self, key: &str) -> KeyValue {
        KeyValue {
            key: key.to_string(),
            value: self.value.to_vec(),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
        }
    }
}

pub(crate) fn encode_key_record(
    create_revision: u64,
    mod_revision: u64,
    version: u64,
    value: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + value.len());
    out.extend_from_slice(&create_revision.to_le_bytes());
    out.extend_from_slice(&mod_revision.to_le_bytes());
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(value);
    out
}

pub(crate) fn decode_key_record(bytes: &[u8]) -> Result<KeyRecord<'_>, RecordError> {
    let mut reader = ByteReader::new(bytes);
    let create_revision = reader.u64("create_revision")?;
    let mod_revision = reader.u64("mod_revision")?;
    let version = reader.u64("version")?;
    Ok(KeyRecord {
        create_revision,
        mod_revision,
        version,
        value: reader.rest(),
    })
}

/// Encodes the changes of one revision (all events share it).
pub(crate) fn encode_changes(events: &[WatchEvent]) -> Vec<u8> {
    let mut out = Vec::new();
    for event in events {
        match event {
            WatchEvent::Put { key_value } => {
                out.push(CHANGE_PUT);
                put_bytes(&mut out, key_value.key.as_bytes());
                out.extend_from_slice(&key_value.create_revision.to_le_bytes());
                out.extend_from_slice(&key_value.version.to_le_bytes());
                put_bytes(&mut out, &key_value.value);
            }
            WatchEvent::Delete { key, .. } => {
                out.push(CHANGE_DELETE);
                put_bytes(&mut out, key.as_bytes());
            }
        }
    }
    out
}

/// Decodes the changes of `revision`, keeping those whose key starts with `prefix`.
pub(crate) fn decode_changes(
    revision: u64,
    bytes: &[u8],
    prefix: &str,
    out: &mut Vec<WatchEvent>,
) -> Result<(), RecordError> {
    let mut reader = ByteReader::new(bytes);
    while !reader.is_empty() {
        let kind = reader.u8("change kind")?;
        let key = reader.string("change key")?;
        match kind {
            CHANGE_PUT => {
                let create_revision = reader.u64("create_revision")?;
                let version = reader.u64("version")?;
                let value = reader.bytes("value")?;
                if key.starts_with(prefix) {
                    out.push(WatchEvent::Put {
                        key_value: KeyValue {
                            key: key.to_string(),
                            value: value.to_vec(),
                            create_revision,
                            mod_revision: revision,
                            version,
                        },
                    });
                }
            }
            CHANGE_DELETE => {
                if key.starts_with(prefix) {
                    out.push(WatchEvent::Delete {
                        key: key.to_string(),
                        revision,
                    });
                }
            }
            kind => return Err(RecordError::UnknownChangeKind { kind }),
        }
    }
    Ok(())
}

/// Writes the snapshot stream header.
pub(crate) fn encode_snapshot_header(revision: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.extend_from_slice(&SNAPSHOT_LAYOUT_VERSION.to_le_bytes());
    out.extend_from_slice(&revision.to_le_bytes());
}

/// Appends one key to a snapshot stream.
pub(crate) fn encode_snapshot_entry(key: &str, record: &[u8], out: &mut Vec<u8>) {
    put_bytes(out, key.as_bytes());
    put_bytes(out, record);
}

/// A decoded snapshot: its revision and its keys with their stored records.
pub(crate) struct DecodedSnapshot<'a> {
    pub revision: u64,
    pub entries: Vec<(&'a str, &'a [u8])>,
}

pub(crate) fn decode_snapshot(bytes: &[u8]) -> Result<DecodedSnapshot<'_>, RecordError> {
    let mut reader = ByteReader::new(bytes);
    if reader.take(SNAPSHOT_MAGIC.len(), "magic").ok() != Some(SNAPSHOT_MAGIC.as_slice()) {
        return Err(RecordError::NotASnapshot);
    }
    let layout = reader.u64("layout version")?;
    if layout > SNAPSHOT_LAYOUT_VERSION {
        return Err(RecordError::SnapshotLayout {
            found: layout,
            supported: SNAPSHOT_LAYOUT_VERSION,
        });
    }
    let revision = reader.u64("revision")?;
    let mut entries = Vec::new();
    while !reader.is_empty() {
        let key = reader.string("snapshot key")?;
        let record = reader.bytes("snapshot record")?;
        decode_key_record(record)?;
        entries.push((key, record));
    }
    Ok(DecodedSnapshot { revision, entries })
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Keys are at most 4 KiB and values at most 4 MiB, so a u32 length always fits.
    let length = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&length.to_le_bytes());
    out.extend_from_slice(bytes);
}

struct ByteReader<'a> {
    bytes: &'a [u8],
}

impl<'a> ByteReader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn rest(self) -> &'a [u8] {
        self.bytes
    }

    fn take(&mut self, count: usize, field: &'static str) -> Result<&'a [u8], RecordError> {
        if self.bytes.len() < count {
            return Err(RecordError::Truncated { field });
        }
        let (head, tail) = self.bytes.split_at(count);
        self.bytes = tail;
        Ok(head)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, RecordError> {
        Ok(self.take(1, field)?[0])
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, RecordError> {
        let mut buffer = [0u8; 8];
        buffer.copy_from_slice(self.take(8, field)?);
        Ok(u64::from_le_bytes(buffer))
    }

    fn bytes(&mut self, field: &'static str) -> Result<&'a [u8], RecordError> {
        let mut buffer = [0u8; 4];
        buffer.copy_from_slice(self.take(4, field)?);
        let length = u32::from_le_bytes(buffer) as usize;
        self.take(length, field)
    }

    fn string(&mut self, field: &'static str) -> Result<&'a str, RecordError> {
        std::str::from_utf8(self.bytes(field)?).map_err(|_| RecordError::KeyNotUtf8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_record_round_trip() {
        let encoded = encode_key_record(3, 7, 2, b"hello");
        let record = decode_key_record(&encoded).expect("decode");
        assert_eq!(
            record,
            KeyRecord {
                create_revision: 3,
                mod_revision: 7,
                version: 2,
                value: b"hello"
            }
        );
        assert!(decode_key_record(&encoded[..10]).is_err());
    }

    #[test]
    fn changes_round_trip_and_filter_by_prefix() {
        let events = vec![
            WatchEvent::Put {
                key_value: KeyValue {
                    key: "vms/a".into(),
                    value: b"1".to_vec(),
                    create_revision: 4,
                    mod_revision: 9,
                    version: 3,
                },
            },
            WatchEvent::Delete {
                key: "images/x".into(),
                revision: 9,
            },
        ];
        let encoded = encode_changes(&events);
        let mut all = Vec::new();
        decode_changes(9, &encoded, "", &mut all).expect("decode");
        assert_eq!(all, events);
        let mut vms = Vec::new();
        decode_changes(9, &encoded, "vms/", &mut vms).expect("decode");
        assert_eq!(vms, events[..1].to_vec());
        let mut truncated = Vec::new();
        assert!(decode_changes(9, &encoded[..encoded.len() - 1], "", &mut truncated).is_err());
    }

    #[test]
    fn snapshot_stream_rejects_garbage_and_round_trips() {
        assert!(matches!(
            decode_snapshot(b"not a snapshot at all, clearly"),
            Err(RecordError::NotASnapshot)
        ));
        let mut stream = Vec::new();
        encode_snapshot_header(42, &mut stream);
        let record = encode_key_record(1, 2, 2, b"v");
        encode_snapshot_entry("vms/a", &record, &mut stream);
        let decoded = decode_snapshot(&stream).expect("decode");
        assert_eq!(decoded.revision, 42);
        assert_eq!(decoded.entries, vec![("vms/a", record.as_slice())]);
    }
}
