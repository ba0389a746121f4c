//! `[vm]`: the guest's NIC, RAM and disk images, for the command-line generator
//! (`qmp-driver qemu-args`).

use super::field::{At, FieldError, Problem, abs_path, mac, nonzero, required, tap};
use colo_types::Role;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Format of the primary's disk and the secondary's base image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// Raw image (default).
    #[default]
    Raw,
    /// qcow2 image.
    Qcow2,
}

impl ImageFormat {
    /// QEMU's driver name.
    pub fn driver(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

/// Where the guest's RAM lives (`vm.memory_backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MemoryBackend {
    /// QEMU's default, private anonymous RAM: the generated lines say nothing about RAM.
    #[default]
    Anonymous,
    /// A shared memfd (`memory-backend-memfd,share=on`): the RAM a vhost-user back-end maps.
    Memfd,
}

/// The `[vm]` section, for the command-line generator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// The primary host's tap device for the guest NIC.
    pub tap: String,
    /// The secondary host's tap (default: the same name as `tap`).
    pub secondary_tap: String,
    /// The guest NIC's MAC address (the same on both VMs).
    pub mac: String,
    /// Guest RAM in MiB (the secondary QEMU needs about twice this).
    pub memory_mib: u32,
    /// The guest RAM's backend (the same on both VMs: COLO needs identical VMs).
    pub memory_backend: MemoryBackend,
    /// Format of `primary_image` and `secondary_image`.
    pub image_format: ImageFormat,
    /// The primary's disk image.
    pub primary_image: PathBuf,
    /// The secondary's copy of the disk (exported over NBD).
    pub secondary_image: PathBuf,
    /// The secondary's active overlay (qcow2, same virtual size); required
    /// with the replication backend, absent with colo-blockd.
    pub secondary_active: Option<PathBuf>,
    /// The secondary's hidden overlay (qcow2, same virtual size); required
    /// with the replication backend, absent with colo-blockd.
    pub secondary_hidden: Option<PathBuf>,
}

impl VmConfig {
    /// The tap of `side`.
    pub fn tap_for(&self, side: Role) -> &str {
        match side {
            Role::Primary => &self.tap,
            Role::Secondary => &self.secondary_tap,
        }
    }
}

/// `[vm]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVm {
    tap: Option<String>,
    secondary_tap: Option<String>,
    mac: Option<String>,
    memory_mib: Option<u32>,
    memory_backend: Option<MemoryBackend>,
    image_format: Option<ImageFormat>,
    primary_image: Option<PathBuf>,
    secondary_image: Option<PathBuf>,
    secondary_active: Option<PathBuf>,
    secondary_hidden: Option<PathBuf>,
}

/// Validates `[vm]` on its own. Whether the two overlays are required or refused depends on
/// `disk.backend`, which [`super::PairConfig`] checks.
impl TryFrom<RawVm> for VmConfig {
    type Error = FieldError;

    fn try_from(raw: RawVm) -> Result<VmConfig, FieldError> {
        let tap = required(raw.tap, "the tap device of the guest NIC, e.g. \"tap-vm1\"")
            .and_then(tap)
            .at("vm.tap")?;
        let secondary_tap = match raw.secondary_tap {
            Some(t) => self::tap(t).at("vm.secondary_tap")?,
            None => tap.clone(),
        };
        let vm = VmConfig {
            tap,
            secondary_tap,
            mac: required(raw.mac, "the guest NIC's MAC, e.g. \"52:54:00:12:34:56\"")
                .and_then(mac)
                .at("vm.mac")?,
            memory_mib: required(raw.memory_mib, "guest RAM in MiB")
                .and_then(|m| nonzero(m, "give the guest RAM in MiB"))
                .at("vm.memory_mib")?,
            memory_backend: raw.memory_backend.unwrap_or_default(),
            image_format: raw.image_format.unwrap_or_default(),
            primary_image: required(raw.primary_image, "the primary's disk image")
                .and_then(abs_path)
                .at("vm.primary_image")?,
            secondary_image: required(
                raw.secondary_image,
                "the secondary's copy of the disk image",
            )
            .and_then(abs_path)
            .at("vm.secondary_image")?,
            secondary_active: raw
                .secondary_active
                .map(abs_path)
                .transpose()
                .at("vm.secondary_active")?,
            secondary_hidden: raw
                .secondary_hidden
                .map(abs_path)
                .transpose()
                .at("vm.secondary_hidden")?,
        };
        // The primary's image lives on another host, so only the secondary's files must
        // differ from each other.
        let mut files = vec![("vm.secondary_image", &vm.secondary_image)];
        files.extend(
            vm.secondary_active
                .as_ref()
                .map(|p| ("vm.secondary_active", p)),
        );
        files.extend(
            vm.secondary_hidden
                .as_ref()
                .map(|p| ("vm.secondary_hidden", p)),
        );
        for (i, (key, path)) in files.iter().enumerate() {
            if let Some((other, _)) = files[..i].iter().find(|(_, p)| p == path) {
                return Err(Problem::SameAs {
                    value: format!("{path:?}"),
                    other: (*other).into(),
                })
                .at(*key);
            }
        }
        Ok(vm)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{MINIMAL, error_key, parse};
    use super::*;

    const VM: &str = r#"
        [vm]
        tap = "tap-vm1"
        mac = "52:54:00:12:34:56"
        memory_mib = 1024
        primary_image = "/var/lib/colo/vm1/primary.raw"
        secondary_image = "/var/lib/colo/vm1/secondary.raw"
        secondary_active = "/var/lib/colo/vm1/active.qcow2"
        secondary_hidden = "/var/lib/colo/vm1/hidden.qcow2"
    "#;

    #[test]
    fn vm_section_defaults_and_errors() {
        let cfg = parse(&format!("{MINIMAL}{VM}")).unwrap();
        let vm = cfg.vm.unwrap();
        assert_eq!(vm.secondary_tap, "tap-vm1");
        assert_eq!(vm.image_format, ImageFormat::Raw);
        assert_eq!(vm.memory_backend, MemoryBackend::Anonymous);
        for (text, backend) in [
            ("anonymous", MemoryBackend::Anonymous),
            ("memfd", MemoryBackend::Memfd),
        ] {
            let with = VM.replace(
                "memory_mib = 1024",
                &format!("memory_mib = 1024\nmemory_backend = \"{text}\""),
            );
            let cfg = parse(&format!("{MINIMAL}{with}")).unwrap();
            assert_eq!(cfg.vm.unwrap().memory_backend, backend, "{text}");
        }
        // Any other backend (hugetlbfs, a file) is refused, naming the key and the choices.
        let bad = VM.replace(
            "memory_mib = 1024",
            "memory_mib = 1024\nmemory_backend = \"file\"",
        );
        let msg = parse(&format!("{MINIMAL}{bad}")).unwrap_err().to_string();
        assert!(
            msg.contains("memory_backend") && msg.contains("memfd"),
            "{msg}"
        );
        let cases: &[(&str, &str, &str)] = &[
            (
                "tap = \"tap-vm1\"",
                "tap = \"a-name-that-is-too-long\"",
                "vm.tap",
            ),
            (
                "tap = \"tap-vm1\"",
                "tap = \"tap-vm1\"\nsecondary_tap = \"x y\"",
                "vm.secondary_tap",
            ),
            (
                "mac = \"52:54:00:12:34:56\"",
                "mac = \"52:54:00:12:34\"",
                "vm.mac",
            ),
            ("mac = \"52:54:00:12:34:56\"", "", "vm.mac"),
            ("memory_mib = 1024", "memory_mib = 0", "vm.memory_mib"),
            (
                "/var/lib/colo/vm1/primary.raw",
                "primary.raw",
                "vm.primary_image",
            ),
            (
                "/var/lib/colo/vm1/hidden.qcow2",
                "/var/lib/colo/vm1/active.qcow2",
                "vm.secondary_hidden",
            ),
            (
                "secondary_image = \"/var/lib/colo/vm1/secondary.raw\"",
                "",
                "vm.secondary_image",
            ),
        ];
        for (from, to, key) in cases {
            let text = format!("{MINIMAL}{}", VM.replace(from, to));
            assert_eq!(error_key(&text), *key, "{from} -> {to}");
        }
    }
}
