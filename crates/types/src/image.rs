//! Image records: disk images stored content-addressed by the BLAKE3 hash of their bytes.

use crate::name::ImageName;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// On-disk format of an image, as `qemu-img info` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Qcow2,
    Raw,
}

impl ImageFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        }
    }
}

/// One image as kept in the store (key `images/<id>`, with a name index `image-names/<name>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageRecord {
    pub format_version: u32,
    /// BLAKE3 hash (hex) of the image file's bytes.
    pub id: String,
    pub name: ImageName,
    pub format: ImageFormat,
    /// Size of the disk the image presents to a guest.
    pub virtual_bytes: u64,
    /// Size of the image file.
    pub file_bytes: u64,
    pub created_at: u64,
}
