//! A client over the gRPC API, for `biogate client ...`, the tests, the demo and the
//! load benchmark: one typed method per call. Each answers with the server's
//! [`tonic::Status`] on failure, so a caller can act on its code; [`remote_error`] turns
//! one into an [`Error`] for a message.

use crate::error::{Error, IoContext, Result};
use crate::server::proto;
use crate::server::proto::biogate_client::BiogateClient;
use std::path::PathBuf;
use tonic::Request;
/// The status a call fails with (tonic's), for callers that match on its code.
pub use tonic::Status;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// How to reach a server.
#[derive(Clone, Debug, Default)]
pub struct ConnectOptions {
    /// e.g. `http://127.0.0.1:50051` or `https://biogate.example:50051`.
    pub addr: String,
    pub token: Option<String>,
    /// CA that signed the server's certificate (https).
    pub ca_cert: Option<PathBuf>,
    /// Client certificate and key for mutual TLS.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Server name to verify, if not the host in `addr`.
    pub domain: Option<String>,
}

/// A connected client that adds the bearer token to every request.
#[derive(Clone)]
pub struct Client {
    inner: BiogateClient<Channel>,
    token: Option<String>,
}

/// What a call answers: its message, or the server's status.
pub type Reply<T> = std::result::Result<T, Status>;

/// A server's refusal as an [`Error`] that keeps the status code's name.
pub fn remote_error(s: Status) -> Error {
    Error::Remote {
        code: crate::server::status_code_name(s.code()),
        message: s.message().to_owned(),
    }
}

/// `(gallery, k, threshold)` as a request's gallery searches.
fn searches(galleries: &[(&str, u32, Option<f32>)]) -> Vec<proto::GallerySearch> {
    galleries
        .iter()
        .map(|&(gallery, k, threshold)| proto::GallerySearch {
            gallery: gallery.into(),
            k,
            threshold,
        })
        .collect()
}

/// Pack f32 values as little-endian bytes (the API's template encoding).
pub fn pack(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

impl Client {
    /// Connect (TLS when `ca_cert` is given).
    pub async fn connect(options: &ConnectOptions) -> Result<Client> {
        let mut endpoint = Channel::from_shared(options.addr.clone())
            .map_err(|e| Error::Config(format!("address {:?}: {e}", options.addr)))?;
        if let Some(ca) = &options.ca_cert {
            let read = |p: &PathBuf| std::fs::read(p).ctx(|| format!("reading {}", p.display()));
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
            if let (Some(c), Some(k)) = (&options.client_cert, &options.client_key) {
                tls = tls.identity(Identity::from_pem(read(c)?, read(k)?));
            }
            if let Some(d) = &options.domain {
                tls = tls.domain_name(d.clone());
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| Error::Config(format!("TLS: {e}")))?;
        }
        let channel = endpoint.connect().await.map_err(|e| {
            // The transport error's own text is "transport error"; the cause is below it.
            let mut cause = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                cause = s.to_string();
                source = s.source();
            }
            Error::Unavailable(format!("cannot connect to {}: {cause}", options.addr))
        })?;
        Ok(Client {
            inner: BiogateClient::new(channel).max_decoding_message_size(64 << 20),
            token: options.token.clone(),
        })
    }

    /// Wrap a message with the bearer token.
    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut r = Request::new(message);
        if let Some(t) = &self.token
            && let Ok(v) = format!("Bearer {t}").parse()
        {
            r.metadata_mut().insert("authorization", v);
        }
        r
    }

    /// The generated client, for requests the typed methods do not build (tests of
    /// malformed input, streams of one's own). Wrap messages with [`Client::request`].
    pub fn raw(&self) -> BiogateClient<Channel> {
        self.inner.clone()
    }

    /// Identify probes (row-major `count * dim` values).
    pub async fn identify(
        &self,
        gallery: &str,
        probes: &[f32],
        dim: usize,
        k: u32,
        threshold: Option<f32>,
    ) -> Reply<Vec<proto::ProbeResult>> {
        let req = proto::IdentifyRequest {
            gallery: gallery.into(),
            probes: probes.chunks_exact(dim).map(pack).collect(),
            k,
            threshold,
            ..Default::default()
        };
        Ok(self.raw().identify(self.request(req)).await?.into_inner().results)
    }

    /// Identify probes in several galleries at once, each `(gallery, k, threshold)`;
    /// one list of results per gallery, in the order given.
    pub async fn identify_in(
        &self,
        galleries: &[(&str, u32, Option<f32>)],
        probes: &[f32],
        dim: usize,
    ) -> Reply<Vec<proto::GalleryResults>> {
        let req = proto::IdentifyRequest {
            probes: probes.chunks_exact(dim).map(pack).collect(),
            galleries: searches(galleries),
            ..Default::default()
        };
        Ok(self.raw().identify(self.request(req)).await?.into_inner().galleries)
    }

    /// Identify probes in several galleries (`(gallery, k, threshold)`) at a border
    /// point: the server records an encounter per probe and gallery under the
    /// response's request id (`request_id`, or one the server makes).
    pub async fn identify_at(
        &self,
        galleries: &[(&str, u32, Option<f32>)],
        probes: &[f32],
        dim: usize,
        context: proto::EncounterContext,
        request_id: Option<&str>,
    ) -> Reply<proto::IdentifyResponse> {
        let req = proto::IdentifyRequest {
            probes: probes.chunks_exact(dim).map(pack).collect(),
            galleries: searches(galleries),
            encounter: Some(context),
            request_id: request_id.unwrap_or_default().into(),
            ..Default::default()
        };
        Ok(self.raw().identify(self.request(req)).await?.into_inner())
    }

    /// A traveller's matched encounters, oldest first.
    pub async fn encounter_history(&self, subject: &str) -> Reply<Vec<proto::Encounter>> {
        let req = proto::EncounterHistoryRequest {
            subject: subject.into(),
        };
        Ok(self
            .raw()
            .encounter_history(self.request(req))
            .await?
            .into_inner()
            .encounters)
    }

    /// Subjects whose last entry has no exit within `max_stay` ("90d"), as of `as_of`
    /// (RFC 3339; now when empty).
    pub async fn overstays(&self, max_stay: &str, as_of: &str) -> Reply<Vec<proto::Overstay>> {
        let req = proto::OverstaysRequest {
            max_stay: max_stay.into(),
            as_of: as_of.into(),
        };
        Ok(self.raw().overstays(self.request(req)).await?.into_inner().overstays)
    }

    /// Probes, matches and match rate per gallery and `by` ("", "location", "gate", "day").
    pub async fn encounter_stats(&self, by: &str) -> Reply<Vec<proto::EncounterStats>> {
        let req = proto::EncounterStatsRequest { by: by.into() };
        Ok(self.raw().encounter_stats(self.request(req)).await?.into_inner().rows)
    }

    /// Verify one probe against a claimed subject.
    pub async fn verify(
        &self,
        gallery: &str,
        probe: &[f32],
        subject: &str,
        threshold: Option<f32>,
    ) -> Reply<proto::VerifyResponse> {
        let req = proto::VerifyRequest {
            gallery: gallery.into(),
            probe: pack(probe),
            subject: subject.into(),
            threshold,
        };
        Ok(self.raw().verify(self.request(req)).await?.into_inner())
    }

    /// Enroll rows with their subject ids, one stream message per run of equal ids.
    pub async fn enroll(
        &self,
        gallery: &str,
        templates: &[f32],
        dim: usize,
        ids: &[String],
    ) -> Reply<proto::EnrollResponse> {
        let mut messages = Vec::new();
        let mut i = 0;
        while i < ids.len() {
            let mut j = i + 1;
            while j < ids.len() && ids[j] == ids[i] {
                j += 1;
            }
            messages.push(proto::EnrollRequest {
                gallery: gallery.into(),
                subject: ids[i].clone(),
                templates: (i..j).map(|r| pack(&templates[r * dim..(r + 1) * dim])).collect(),
                ..Default::default()
            });
            i = j;
        }
        let stream = tokio_stream::iter(messages);
        Ok(self.raw().enroll(self.request(stream)).await?.into_inner())
    }

    /// Delete a subject and all its templates.
    pub async fn delete_subject(&self, gallery: &str, subject: &str) -> Reply<()> {
        let req = proto::DeleteSubjectRequest {
            gallery: gallery.into(),
            subject: subject.into(),
        };
        self.raw().delete_subject(self.request(req)).await?;
        Ok(())
    }

    /// Every gallery, serving or not.
    pub async fn list_galleries(&self) -> Reply<Vec<proto::GalleryInfo>> {
        let req = proto::ListGalleriesRequest {};
        Ok(self
            .raw()
            .list_galleries(self.request(req))
            .await?
            .into_inner()
            .galleries)
    }

    /// One gallery's shape and state.
    pub async fn get_gallery(&self, name: &str) -> Reply<proto::GalleryInfo> {
        let req = proto::GetGalleryRequest { name: name.into() };
        Ok(self.raw().get_gallery(self.request(req)).await?.into_inner())
    }

    /// Create a gallery (`dtype`: "f32", "f16" or "i8").
    pub async fn create_gallery(&self, name: &str, dim: u32, dtype: &str) -> Reply<proto::GalleryInfo> {
        self.create_sharded_gallery(name, dim, dtype, 0, 0).await
    }

    /// Create a gallery of `shards` shards with `replicas` replicas each, through a
    /// cluster's router (0 and 0: the defaults; a single server takes only those or 1).
    pub async fn create_sharded_gallery(
        &self,
        name: &str,
        dim: u32,
        dtype: &str,
        shards: u32,
        replicas: u32,
    ) -> Reply<proto::GalleryInfo> {
        let req = proto::CreateGalleryRequest {
            name: name.into(),
            dim,
            dtype: dtype.into(),
            shards,
            replicas,
            ..Default::default()
        };
        Ok(self.raw().create_gallery(self.request(req)).await?.into_inner())
    }

    /// Create gallery `name` from the templates of `subjects` in gallery `source` (a
    /// flight's gallery from the master); the answer's `missing_subjects` names those the
    /// source lacks.
    pub async fn derive_gallery(&self, name: &str, source: &str, subjects: &[String]) -> Reply<proto::GalleryInfo> {
        let req = proto::CreateGalleryRequest {
            name: name.into(),
            source: source.into(),
            subjects: subjects.to_vec(),
            ..Default::default()
        };
        Ok(self.raw().create_gallery(self.request(req)).await?.into_inner())
    }

    /// Drop a gallery and delete its data.
    pub async fn drop_gallery(&self, name: &str) -> Reply<()> {
        let req = proto::DropGalleryRequest { name: name.into() };
        self.raw().drop_gallery(self.request(req)).await?;
        Ok(())
    }

    /// Repair a gallery on the server.
    pub async fn repair_gallery(&self, name: &str) -> Reply<proto::RepairGalleryResponse> {
        let req = proto::RepairGalleryRequest { name: name.into() };
        Ok(self.raw().repair_gallery(self.request(req)).await?.into_inner())
    }

    /// Compact a gallery on the server.
    pub async fn compact_gallery(&self, name: &str) -> Reply<proto::CompactGalleryResponse> {
        let req = proto::CompactGalleryRequest { name: name.into() };
        Ok(self.raw().compact_gallery(self.request(req)).await?.into_inner())
    }
}
