//! The device's identity: its tag and number of request queues, and the virtio-fs
//! configuration space the guest reads them from (`struct virtio_fs_config`: a 36-byte
//! NUL-padded tag, then the request queue count, little-endian).
//!
//! Owns the checks on user-given values; never touches queues or the appliance.

/// Bytes of the tag field.
pub const TAG_LEN: usize = 36;
/// Most request queues a device offers (the high-priority queue comes on top; the
/// vhost-user worker mask is 64 bits).
pub const MAX_REQUEST_QUEUES: u16 = 63;

/// Why a configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("tag `{0}` is empty, longer than {TAG_LEN} bytes or holds a NUL: use a short name such as `fsva`")]
    BadTag(String),
    #[error("{0} request queues: give 1 to {MAX_REQUEST_QUEUES}")]
    BadQueues(u16),
}

/// What the guest sees of the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    tag: Option<String>,
    request_queues: u16,
}

impl DeviceConfig {
    /// `tag` is what the guest mounts (`mount -t virtiofs TAG`); `None` when the VMM
    /// supplies it (QEMU's vhost-user-fs-pci does).
    pub fn new(tag: Option<String>, request_queues: u16) -> Result<Self, ConfigError> {
        if let Some(t) = &tag {
            if t.is_empty() || t.len() > TAG_LEN || t.contains('\0') {
                return Err(ConfigError::BadTag(t.clone()));
            }
        }
        if request_queues == 0 || request_queues > MAX_REQUEST_QUEUES {
            return Err(ConfigError::BadQueues(request_queues));
        }
        Ok(DeviceConfig {
            tag,
            request_queues,
        })
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn request_queues(&self) -> u16 {
        self.request_queues
    }

    /// All queues: the high-priority one and the request queues.
    pub fn num_queues(&self) -> usize {
        1 + usize::from(self.request_queues)
    }

    /// `size` bytes of the configuration space from `offset`; empty if out of range.
    pub fn space(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut space = [0u8; TAG_LEN + 4];
        if let Some(t) = &self.tag {
            space[..t.len()].copy_from_slice(t.as_bytes());
        }
        space[TAG_LEN..].copy_from_slice(&u32::from(self.request_queues).to_le_bytes());
        let (offset, size) = (offset as usize, size as usize);
        match offset.checked_add(size) {
            Some(end) if end <= space.len() => space[offset..end].to_vec(),
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_holds_tag_and_queue_count() {
        let c = DeviceConfig::new(Some("fsva".into()), 2).unwrap();
        let s = c.space(0, 40);
        assert_eq!(&s[..5], b"fsva\0");
        assert_eq!(&s[36..], &2u32.to_le_bytes());
        assert_eq!(c.space(36, 4), 2u32.to_le_bytes());
        assert!(c.space(38, 4).is_empty());
        assert!(c.space(u32::MAX, 2).is_empty());
        assert_eq!(c.num_queues(), 3);
    }

    #[test]
    fn bad_tags_and_queue_counts_are_refused() {
        assert!(DeviceConfig::new(Some(String::new()), 1).is_err());
        assert!(DeviceConfig::new(Some("x".repeat(37)), 1).is_err());
        assert!(DeviceConfig::new(Some("a\0b".into()), 1).is_err());
        assert!(DeviceConfig::new(None, 0).is_err());
        assert!(DeviceConfig::new(None, 64).is_err());
        assert!(DeviceConfig::new(Some("x".repeat(36)), 63).is_ok());
    }
}
