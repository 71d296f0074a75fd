//! `[tunnel]`: how a tunnel's bytes are moved, and the socket options of its two ends.
//!
//! The defaults are the ones measured best on the peerbench harness (README, Performance:
//! "what a relay does to its peers"): splice, and `TCP_NOTSENT_LOWAT` at 16 KiB, so that
//! the relay moves bytes at the pace the receiver takes them instead of the moment they
//! arrive. The other values stay for operators whose links differ (a WAN parent, say) and
//! for measuring them again (`benches/peerbench/run.sh tunnel`).

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

/// How a burst of readable bytes goes from one socket to the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayMode {
    /// Through a user-space buffer lent for the burst (`tunnel.buffer`).
    Copy,
    /// Linux: socket → pipe → socket with `splice(2)` (`tunnel.pipe`); elsewhere, copy.
    Splice,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelConfig {
    pub relay: RelayMode,
    /// The buffer a direction borrows for one burst (copy), and reads into per syscall.
    pub buffer: ByteSize,
    /// The pipe capacity asked for (splice); the kernel may round it or refuse.
    pub pipe: ByteSize,
    /// `TCP_NODELAY` on the client's socket (the direction towards the client).
    pub client_nodelay: bool,
    /// `TCP_NODELAY` on the origin's (or plain parent's) socket.
    pub origin_nodelay: bool,
    /// `SO_SNDBUF` / `SO_RCVBUF` of both ends; 0 keeps the kernel's autotuning.
    pub send_buffer: ByteSize,
    pub recv_buffer: ByteSize,
    /// `TCP_NOTSENT_LOWAT` of both ends; 0 leaves it unset.
    pub notsent_lowat: ByteSize,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        TunnelConfig {
            relay: RelayMode::Splice,
            buffer: ByteSize::kib(16),
            pipe: ByteSize::kib(256),
            client_nodelay: true,
            origin_nodelay: true,
            send_buffer: ByteSize::b(0),
            recv_buffer: ByteSize::b(0),
            notsent_lowat: ByteSize::kib(16),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TunnelConfigError {
    #[error("{0}: must be between 4 KiB and 4 MiB")]
    Buffer(ByteSize),
    #[error("{0}: must be between 4 KiB and 1 MiB (the kernel's pipe-max-size)")]
    Pipe(ByteSize),
    #[error("{0}: must be 0 (the kernel's autotuning) or between 4 KiB and 64 MiB")]
    SocketBuffer(ByteSize, &'static str),
    #[error("{0}: must be 0 (unset) or between 1 byte and 64 MiB")]
    NotsentLowat(ByteSize),
}

// === impl TunnelConfig ===

impl TunnelConfig {
    pub fn validate(&self) -> Result<(), TunnelConfigError> {
        const KIB: u64 = 1024;
        const MIB: u64 = 1024 * KIB;
        if !(4 * KIB..=4 * MIB).contains(&self.buffer.as_u64()) {
            return Err(TunnelConfigError::Buffer(self.buffer));
        }
        if !(4 * KIB..=MIB).contains(&self.pipe.as_u64()) {
            return Err(TunnelConfigError::Pipe(self.pipe));
        }
        for (size, key) in [
            (self.send_buffer, "tunnel.send_buffer"),
            (self.recv_buffer, "tunnel.recv_buffer"),
        ] {
            let n = size.as_u64();
            if n != 0 && !(4 * KIB..=64 * MIB).contains(&n) {
                return Err(TunnelConfigError::SocketBuffer(size, key));
            }
        }
        if self.notsent_lowat.as_u64() > 64 * MIB {
            return Err(TunnelConfigError::NotsentLowat(self.notsent_lowat));
        }
        Ok(())
    }

    /// The settings a relay runs with (plain numbers, copied into the tunnel's task).
    pub fn settings(&self) -> RelaySettings {
        let size = |b: ByteSize| usize::try_from(b.as_u64()).unwrap_or(usize::MAX);
        RelaySettings {
            mode: self.relay,
            buffer: size(self.buffer),
            pipe: size(self.pipe),
            client_nodelay: self.client_nodelay,
            origin_nodelay: self.origin_nodelay,
            send_buffer: size(self.send_buffer),
            recv_buffer: size(self.recv_buffer),
            notsent_lowat: u32::try_from(self.notsent_lowat.as_u64()).unwrap_or(u32::MAX),
        }
    }
}

// === impl TunnelConfigError ===

impl TunnelConfigError {
    /// The config key at fault.
    pub fn key(&self) -> &'static str {
        match self {
            TunnelConfigError::Buffer(_) => "tunnel.buffer",
            TunnelConfigError::Pipe(_) => "tunnel.pipe",
            TunnelConfigError::SocketBuffer(_, key) => key,
            TunnelConfigError::NotsentLowat(_) => "tunnel.notsent_lowat",
        }
    }
}

/// [`TunnelConfig`] as the relay uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelaySettings {
    pub mode: RelayMode,
    pub buffer: usize,
    pub pipe: usize,
    pub client_nodelay: bool,
    pub origin_nodelay: bool,
    pub send_buffer: usize,
    pub recv_buffer: usize,
    pub notsent_lowat: u32,
}

impl Default for RelaySettings {
    fn default() -> Self {
        TunnelConfig::default().settings()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(edit: impl FnOnce(&mut TunnelConfig)) -> Result<(), TunnelConfigError> {
        let mut config = TunnelConfig::default();
        edit(&mut config);
        config.validate()
    }

    #[test]
    fn the_default_is_valid() {
        assert!(TunnelConfig::default().validate().is_ok());
    }

    #[test]
    fn out_of_range_sizes_name_their_key() {
        type Edit = fn(&mut TunnelConfig);
        let cases: [(Edit, &str); 5] = [
            (|c| c.buffer = ByteSize::b(100), "tunnel.buffer"),
            (|c| c.pipe = ByteSize::mib(2), "tunnel.pipe"),
            (|c| c.send_buffer = ByteSize::b(10), "tunnel.send_buffer"),
            (|c| c.recv_buffer = ByteSize::gib(1), "tunnel.recv_buffer"),
            (
                |c| c.notsent_lowat = ByteSize::gib(1),
                "tunnel.notsent_lowat",
            ),
        ];
        for (edit, key) in cases {
            let err = with(edit).unwrap_err();
            assert_eq!(err.key(), key, "{err}");
        }
    }

    #[test]
    fn zero_keeps_the_kernel_defaults() {
        let settings = TunnelConfig {
            send_buffer: ByteSize::b(0),
            recv_buffer: ByteSize::b(0),
            notsent_lowat: ByteSize::b(0),
            ..TunnelConfig::default()
        };
        assert!(settings.validate().is_ok());
        let s = settings.settings();
        assert_eq!((s.send_buffer, s.recv_buffer, s.notsent_lowat), (0, 0, 0));
    }
}
