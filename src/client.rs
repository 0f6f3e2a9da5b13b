//! A small client over the gRPC API, for `biogate client ...`, the tests and the demo.

use crate::error::{Error, IoContext, Result};
use crate::server::proto;
use crate::server::proto::biogate_client::BiogateClient;
use std::path::PathBuf;
use tonic::Request;
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
    pub inner: BiogateClient<Channel>,
    token: Option<String>,
}

/// A server's refusal as an error that keeps the status code's name.
pub fn rpc_error(e: tonic::Status) -> Error {
    Error::invalid(format!("server answered {:?}: {}", e.code(), e.message()))
}

impl Client {
    /// Connect (TLS when `ca_cert` is given).
    pub async fn connect(options: &ConnectOptions) -> Result<Client> {
        let mut endpoint = Channel::from_shared(options.addr.clone())
            .map_err(|e| Error::invalid(format!("address {:?}: {e}", options.addr)))?;
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
                .map_err(|e| Error::invalid(format!("TLS: {e}")))?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| Error::invalid(format!("connecting to {}: {e}", options.addr)))?;
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

    /// Identify probes (row-major `count * dim` values).
    pub async fn identify(
        &self,
        gallery: &str,
        probes: &[f32],
        dim: usize,
        k: u32,
        threshold: Option<f32>,
    ) -> Result<Vec<proto::ProbeResult>> {
        let req = proto::IdentifyRequest {
            gallery: gallery.into(),
            probes: probes.chunks_exact(dim).map(pack).collect(),
            k,
            threshold,
        };
        let r = self
            .inner
            .clone()
            .identify(self.request(req))
            .await
            .map_err(rpc_error)?;
        Ok(r.into_inner().results)
    }

    /// Enroll rows with their subject ids, one stream message per run of equal ids.
    pub async fn enroll(
        &self,
        gallery: &str,
        templates: &[f32],
        dim: usize,
        ids: &[String],
    ) -> Result<proto::EnrollResponse> {
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
            });
            i = j;
        }
        let r = self
            .inner
            .clone()
            .enroll(self.request(tokio_stream::iter(messages)))
            .await
            .map_err(rpc_error)?;
        Ok(r.into_inner())
    }
}

/// Pack f32 values as little-endian bytes (the API's template encoding).
pub fn pack(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}
