//! Server configuration: a TOML file, overridden by flags and environment variables
//! (the CLI applies those), with defaults that need no file at all.

use crate::engine::BackendChoice;
use crate::error::{Error, IoContext, Result};
use crate::template::Dtype;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Everything `biogate serve` can be told.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where galleries (and the audit log) live.
    pub data_dir: PathBuf,
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Prometheus metrics listen address (`GET /metrics`); `"off"` (or leaving it out
    /// of a configuration that says nothing else) disables.
    #[serde(deserialize_with = "address_or_off")]
    pub metrics_listen: Option<SocketAddr>,
    /// Gallery created on first start when the data directory has none.
    pub default_gallery: Option<DefaultGallery>,
    /// Which backend searches: cpu, gpu (fails to start without one) or auto.
    pub backend: BackendChoice,
    /// Most probes in one engine batch.
    pub max_batch: usize,
    /// How long the engine thread waits for more work before running a batch that is
    /// not full. Zero: run whatever is queued at once (no added latency when idle;
    /// batches still form under load while the engine is busy).
    pub max_wait_us: u64,
    /// Requests waiting for the engine; more are refused with RESOURCE_EXHAUSTED.
    pub queue_capacity: usize,
    /// Largest request message accepted.
    pub max_message_bytes: usize,
    /// Largest k a request may ask for.
    pub max_k: usize,
    /// Most probes in one Identify request.
    pub max_probes_per_request: usize,
    /// Seal a gallery's log into a segment once it holds this many templates (keeps
    /// memory, log size and start-up replay bounded while the server runs).
    pub seal_log_rows: usize,
    /// Merge a gallery's segments in the background once this many are of a similar
    /// size (within 4x), or rewrite one with a quarter of its rows deleted; 0 turns
    /// automatic merges off (CompactGallery still compacts).
    pub merge_segments: usize,
    /// How long a graceful shutdown waits for in-flight requests (and open streams, such
    /// as health watches) before it cuts them off.
    pub shutdown_grace_ms: u64,
    /// Most open client connections. When full, the oldest connection that has made no
    /// request (silent, or that sent only bytes such as the HTTP/2 preface) is closed to
    /// admit a new one; if every connection has made a request, the new one is refused
    /// (counted and logged).
    pub max_connections: usize,
    /// Most open connections from one IP address (the same rule applies within it);
    /// 0: a quarter of `max_connections`.
    pub max_connections_per_address: usize,
    /// A connection that has not made its first request this long after it opens is
    /// closed (the TLS handshake, the HTTP/2 preface and the request's headers must all
    /// arrive within it).
    pub handshake_timeout_ms: u64,
    /// HTTP/2 keepalive: ping a connection idle this long (0: never) ...
    pub keepalive_interval_ms: u64,
    /// ... and close it if the ping is not answered within this.
    pub keepalive_timeout_ms: u64,
    /// Concurrent HTTP/2 streams (calls) per connection; more wait in the client.
    pub max_streams_per_connection: u32,
    /// Calls being handled at once over all connections; more are refused with
    /// RESOURCE_EXHAUSTED before they take memory.
    pub max_requests_in_flight: usize,
    /// Re-verify every segment's checksums this often, in the background (0: never;
    /// segments are always verified once after they are opened).
    pub scrub_interval_s: u64,
    /// Read rate of the scrub, so that it never competes with searches for the disk.
    pub scrub_mb_per_s: u64,
    /// How often the files in use are checked for being replaced, truncated or
    /// written under the server (a stat per file).
    pub file_check_interval_ms: u64,
    /// A gallery's log idle for this long has its final length recorded (one fsync),
    /// so that a cut of the log is recognised as damage even after a crash: only a
    /// crash within this long of the last write leaves the last commit group
    /// unprovable (RELIABILITY.md). 0: only when the server stops cleanly.
    pub log_idle_ms: u64,
    /// The audit log's rotation and retention.
    pub audit: AuditConfig,
    /// Retention of the encounter log (`DATA/encounters.sqlite`).
    pub encounters: EncountersConfig,
    /// Retention of galleries and subjects: default expiries by gallery name, and how
    /// often expired ones are purged.
    pub retention: RetentionConfig,
    /// TLS (and mutual TLS when `client_ca` is set).
    pub tls: Option<TlsConfig>,
    /// Bearer tokens. Empty: no authentication (every caller is "anonymous" with every
    /// role), which the server logs loudly; fine on loopback, not on a network.
    pub tokens: Vec<TokenConfig>,
}

/// The gallery made on first start.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultGallery {
    pub name: String,
    pub dim: usize,
    pub dtype: Dtype,
}

/// Rotation and retention of `DATA/audit.log`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Rotate once the file reaches this size.
    pub rotate_bytes: u64,
    /// Rotate once the file is this old (seconds).
    pub rotate_after_s: u64,
    /// Delete rotated files older than this (days; 0 keeps them forever).
    pub keep_days: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            rotate_bytes: 64 << 20,
            rotate_after_s: 86_400,
            keep_days: 400,
        }
    }
}

/// How long encounters are kept, and how often the rule is applied.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncountersConfig {
    /// Every encounter is kept this long (a whole number and s, m, h, d or y).
    pub keep: String,
    /// An overstayer's encounters are kept this long (at least `keep`).
    pub keep_overstayers: String,
    /// A stay longer than this makes an overstayer.
    pub max_stay: String,
    /// Seconds between purges (0: never purge).
    pub purge_interval_s: u64,
}

impl Default for EncountersConfig {
    fn default() -> Self {
        // The EU Entry/Exit System's periods: 3 years, 5 for overstayers, 90 days' stay.
        EncountersConfig {
            keep: "3y".into(),
            keep_overstayers: "5y".into(),
            max_stay: "90d".into(),
            purge_interval_s: 3600,
        }
    }
}

impl EncountersConfig {
    /// The rule, checked.
    pub fn retention(&self) -> Result<crate::encounters::Retention> {
        use crate::time_text::parse_duration;
        let field = |name: &str, text: &str| {
            parse_duration(text, &format!("encounters.{name}")).map_err(|e| Error::Config(e.to_string()))
        };
        let rule = crate::encounters::Retention {
            keep_ms: field("keep", &self.keep)?,
            keep_overstayers_ms: field("keep_overstayers", &self.keep_overstayers)?,
            max_stay_ms: field("max_stay", &self.max_stay)?,
        };
        if rule.keep_overstayers_ms < rule.keep_ms {
            return Err(Error::Config(format!(
                "encounters.keep_overstayers ({}) is shorter than encounters.keep ({})",
                self.keep_overstayers, self.keep
            )));
        }
        Ok(rule)
    }
}

/// Expiry rules for galleries and their subjects.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Seconds between purges of expired galleries and subjects (0: never purge;
    /// expired ones are still never answered).
    pub purge_interval_s: u64,
    /// The first rule whose `galleries` matches a gallery's name applies to it.
    pub rules: Vec<RetentionRule>,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            purge_interval_s: 60,
            rules: Vec::new(),
        }
    }
}

/// Default expiries for the galleries a name pattern matches.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionRule {
    /// A gallery name, or a prefix ending in `*` (`"flight-*"`).
    pub galleries: String,
    /// A subject enrolled without `expires_at` expires this long after its enrollment
    /// (e.g. "12h", "3y").
    pub subject_retention: Option<String>,
    /// A gallery created without `expires_at` expires this long after its creation.
    pub gallery_retention: Option<String>,
}

impl RetentionRule {
    fn matches(&self, gallery: &str) -> bool {
        match self.galleries.strip_suffix('*') {
            Some(prefix) => gallery.starts_with(prefix),
            None => gallery == self.galleries,
        }
    }
}

impl RetentionConfig {
    fn duration(text: &Option<String>, field: String) -> Result<Option<i64>> {
        text.as_deref()
            .map(|t| crate::time_text::parse_duration(t, &field).map_err(|e| Error::Config(e.to_string())))
            .transpose()
    }

    /// Check every rule's durations (errors name the rule and field).
    pub fn validate(&self) -> Result<()> {
        for (i, r) in self.rules.iter().enumerate() {
            if r.galleries.is_empty() {
                return Err(Error::Config(format!("retention.rules[{i}].galleries: empty")));
            }
            Self::duration(&r.subject_retention, format!("retention.rules[{i}].subject_retention"))?;
            Self::duration(&r.gallery_retention, format!("retention.rules[{i}].gallery_retention"))?;
        }
        Ok(())
    }

    /// The rule for gallery `name`, if any.
    pub fn rule_for(&self, name: &str) -> Option<&RetentionRule> {
        self.rules.iter().find(|r| r.matches(name))
    }

    /// How long `name`'s subjects are kept by default (ms).
    pub fn subject_retention_ms(&self, name: &str) -> Option<i64> {
        let r = self.rule_for(name)?;
        Self::duration(&r.subject_retention, String::new()).ok().flatten()
    }

    /// How long a new gallery `name` is kept by default (ms).
    pub fn gallery_retention_ms(&self, name: &str) -> Option<i64> {
        let r = self.rule_for(name)?;
        Self::duration(&r.gallery_retention, String::new()).ok().flatten()
    }
}

/// PEM files for TLS.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// One bearer token and what it may do.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who this is, for logs and the audit trail (e.g. "gate-A12").
    pub name: String,
    pub token: String,
    pub roles: Vec<Role>,
}

/// What a caller may do. `admin` includes the other two.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Identify,
    Enroll,
    Admin,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./biogate-data"),
            listen: "127.0.0.1:50051".parse().expect("valid address"),
            metrics_listen: Some("127.0.0.1:9464".parse().expect("valid address")),
            default_gallery: Some(DefaultGallery {
                name: "default".into(),
                dim: 512,
                dtype: Dtype::F32,
            }),
            backend: BackendChoice::Auto,
            max_batch: 256,
            max_wait_us: 0,
            queue_capacity: 4096,
            max_message_bytes: 16 << 20,
            max_k: 100,
            max_probes_per_request: 1024,
            shutdown_grace_ms: 10_000,
            seal_log_rows: 100_000,
            merge_segments: 4,
            max_connections: 1024,
            max_connections_per_address: 0,
            handshake_timeout_ms: 10_000,
            keepalive_interval_ms: 30_000,
            keepalive_timeout_ms: 10_000,
            max_streams_per_connection: 128,
            max_requests_in_flight: 4096,
            scrub_interval_s: 86_400,
            scrub_mb_per_s: 200,
            file_check_interval_ms: 1000,
            log_idle_ms: 50,
            audit: AuditConfig::default(),
            encounters: EncountersConfig::default(),
            retention: RetentionConfig::default(),
            tls: None,
            tokens: Vec::new(),
        }
    }
}

impl Config {
    /// Read a TOML file; fields it leaves out keep their defaults.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).ctx(|| format!("reading config {}", path.display()))?;
        let config: Config =
            toml::from_str(&text).map_err(|e| Error::Config(format!("config {}: {e}", path.display())))?;
        config.validate()?;
        Ok(config)
    }

    /// The connection limits for the accept loop.
    pub fn connection_limits(&self) -> super::connections::ConnectionLimits {
        super::connections::ConnectionLimits {
            max_connections: self.max_connections,
            max_per_address: match self.max_connections_per_address {
                0 => (self.max_connections / 4).max(1),
                n => n,
            },
            handshake_timeout: std::time::Duration::from_millis(self.handshake_timeout_ms),
        }
    }

    /// Check values that TOML's types cannot.
    pub fn validate(&self) -> Result<()> {
        self.encounters.retention()?;
        self.retention.validate()?;
        if self.max_batch == 0 || self.queue_capacity == 0 || self.max_probes_per_request == 0 {
            return Err(Error::Config(
                "max_batch, queue_capacity and max_probes_per_request must be positive".into(),
            ));
        }
        if self.max_connections == 0 || self.max_requests_in_flight == 0 || self.max_streams_per_connection == 0 {
            return Err(Error::Config(
                "max_connections, max_requests_in_flight and max_streams_per_connection must be positive".into(),
            ));
        }
        if self.handshake_timeout_ms == 0 || self.file_check_interval_ms == 0 || self.scrub_mb_per_s == 0 {
            return Err(Error::Config(
                "handshake_timeout_ms, file_check_interval_ms and scrub_mb_per_s must be positive".into(),
            ));
        }
        if self.audit.rotate_bytes < 4096 || self.audit.rotate_after_s == 0 {
            return Err(Error::Config(
                "audit.rotate_bytes must be at least 4096 and audit.rotate_after_s positive".into(),
            ));
        }
        if self.max_k == 0 || self.max_k > crate::engine::MAX_K {
            return Err(Error::Config(format!("max_k must be in 1..={}", crate::engine::MAX_K)));
        }
        let mut seen = std::collections::HashSet::new();
        for t in &self.tokens {
            if t.token.len() < 16 {
                return Err(Error::Config(format!(
                    "token for {:?} is shorter than 16 characters",
                    t.name
                )));
            }
            if !seen.insert(&t.token) {
                return Err(Error::Config(format!("token for {:?} is listed twice", t.name)));
            }
        }
        Ok(())
    }

    /// A server on an ephemeral loopback port over `data_dir`, with no metrics endpoint
    /// and no default gallery (demos, benchmarks, tests).
    pub fn loopback(data_dir: &Path) -> Config {
        Config {
            data_dir: data_dir.to_path_buf(),
            listen: "127.0.0.1:0".parse().expect("valid address"),
            metrics_listen: None,
            default_gallery: None,
            ..Config::default()
        }
    }

    /// The batching wait as a duration.
    pub fn max_wait(&self) -> Duration {
        Duration::from_micros(self.max_wait_us)
    }
}

/// A socket address, or "off" (also "" ) for none.
fn address_or_off<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(d)?;
    match text.trim() {
        "off" | "" => Ok(None),
        other => other.parse().map(Some).map_err(|e| {
            serde::de::Error::custom(format!(
                "metrics_listen {other:?}: {e} (an address such as 127.0.0.1:9464, or \"off\")"
            ))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses_and_unknown_fields_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, include_str!("../../biogate.example.toml")).unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.listen.port(), 50051);
        assert_eq!(c.tokens.len(), 3);
        assert_eq!(c.tokens[1].roles, [Role::Identify, Role::Enroll]);
        assert_eq!(c.default_gallery.unwrap().dtype, Dtype::I8);
        assert!(c.tls.unwrap().client_ca.is_some());

        std::fs::write(&path, "listen = \"127.0.0.1:1\"\nmax_batsh = 3\n").unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(e.contains("max_batsh"), "{e}");
        std::fs::write(
            &path,
            "[[tokens]]\nname = \"x\"\ntoken = \"short\"\nroles = [\"identify\"]\n",
        )
        .unwrap();
        assert!(Config::load(&path).unwrap_err().to_string().contains("shorter than 16"));
    }

    #[test]
    fn encounter_retention_rules_are_checked_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let rule = Config::default().encounters.retention().unwrap();
        assert_eq!(
            (rule.keep_ms, rule.max_stay_ms),
            (3 * 365 * 86_400_000, 90 * 86_400_000)
        );
        for (toml, needle) in [
            ("[encounters]\nkeep = \"3 years\"\n", "encounters.keep"),
            ("[encounters]\nmax_stay = \"0d\"\n", "encounters.max_stay"),
            (
                "[encounters]\nkeep = \"5y\"\nkeep_overstayers = \"3y\"\n",
                "shorter than encounters.keep",
            ),
        ] {
            std::fs::write(&path, toml).unwrap();
            let e = Config::load(&path).unwrap_err().to_string();
            assert!(e.contains(needle), "{toml}: {e}");
        }
    }

    #[test]
    fn metrics_listen_takes_an_address_or_off_as_the_flag_does() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "metrics_listen = \"off\"\n").unwrap();
        assert_eq!(Config::load(&path).unwrap().metrics_listen, None);
        std::fs::write(&path, "metrics_listen = \"127.0.0.1:9999\"\n").unwrap();
        assert_eq!(Config::load(&path).unwrap().metrics_listen.unwrap().port(), 9999);
        std::fs::write(&path, "listen = \"127.0.0.1:1\"\n").unwrap();
        assert_eq!(
            Config::load(&path).unwrap().metrics_listen.unwrap().port(),
            9464,
            "the default"
        );
        std::fs::write(&path, "metrics_listen = \"nowhere\"\n").unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(e.contains("metrics_listen") && e.contains("nowhere"), "{e}");
    }
}
