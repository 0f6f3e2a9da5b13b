//! The cluster's object storage, through the `object_store` crate: `file:///dir` (the
//! local filesystem, every write fsynced with its directory) or, with the `s3` feature,
//! `s3://bucket/prefix` (credentials from the usual AWS environment variables).
//!
//! ```text
//! galleries/{g}-{created_ms}/{s}/batches/{node}-{ms}-{n}.bgb   one enrollment or deletion batch
//! galleries/{g}-{created_ms}/{s}/checkpoints/{seq}-{node}-{nonce}/{file}   a replica's files (checkpoint.rs)
//! ```
//!
//! `BIOGATE_FAULT_SLOW_UPLOAD_MS` (fault injection, for tests) makes every file upload
//! (a checkpoint's) take that much longer, as a slow remote store would.

use crate::error::{Error, IoContext, Result};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use std::sync::Arc;

/// Part size of a file copied to or from the store.
const PART: usize = 8 << 20;
/// Parts uploaded at once.
const PARTS_IN_FLIGHT: usize = 4;

/// An object store, and the prefix under which the cluster keeps its objects.
#[derive(Clone)]
pub struct Objects {
    store: Arc<dyn ObjectStore>,
    url: String,
    /// Added to each file upload (`BIOGATE_FAULT_SLOW_UPLOAD_MS`).
    upload_delay: std::time::Duration,
}

fn failed(what: &str, path: &str, e: object_store::Error) -> Error {
    Error::Unavailable(format!("object store: {what} {path}: {e}"))
}

impl Objects {
    /// Open the store at `url`.
    pub fn open(url: &str) -> Result<Objects> {
        let store: Arc<dyn ObjectStore> = if let Some(dir) = url.strip_prefix("file://") {
            std::fs::create_dir_all(dir).map_err(|e| Error::Config(format!("--store {url}: {e}")))?;
            Arc::new(
                object_store::local::LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| Error::Config(format!("--store {url}: {e}")))?
                    .with_fsync(true),
            )
        } else {
            Self::remote(url)?
        };
        let upload_delay = super::fault_delay("BIOGATE_FAULT_SLOW_UPLOAD_MS");
        Ok(Objects {
            store,
            url: url.to_owned(),
            upload_delay,
        })
    }

    #[cfg(feature = "s3")]
    fn remote(url: &str) -> Result<Arc<dyn ObjectStore>> {
        let parsed = url::Url::parse(url).map_err(|e| Error::Config(format!("--store {url}: {e}")))?;
        let (store, prefix) = object_store::parse_url_opts(&parsed, std::env::vars())
            .map_err(|e| Error::Config(format!("--store {url}: {e}")))?;
        Ok(Arc::new(object_store::prefix::PrefixStore::new(store, prefix)))
    }

    #[cfg(not(feature = "s3"))]
    fn remote(url: &str) -> Result<Arc<dyn ObjectStore>> {
        Err(Error::Config(format!(
            "--store {url}: only file:///dir is built in; build with the `s3` feature for S3-compatible stores"
        )))
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Write `bytes` at `path`, durably (atomic: readers see all of it or nothing).
    pub async fn put(&self, path: &str, bytes: Vec<u8>) -> Result<()> {
        self.store
            .put(&Path::from(path), bytes.into())
            .await
            .map_err(|e| failed("writing", path, e))?;
        Ok(())
    }

    /// Copy the file `from` to the object at `path` in parts of `PART` bytes (a
    /// segment is never in memory whole), durably.
    pub async fn put_file(&self, path: &str, from: &std::path::Path) -> Result<()> {
        use tokio::io::AsyncReadExt;
        if !self.upload_delay.is_zero() {
            tokio::time::sleep(self.upload_delay).await;
        }
        let upload = self
            .store
            .put_multipart(&Path::from(path))
            .await
            .map_err(|e| failed("writing", path, e))?;
        let mut parts = object_store::WriteMultipart::new_with_chunk_size(upload, PART);
        let mut file = tokio::fs::File::open(from)
            .await
            .ctx(|| format!("opening {}", from.display()))?;
        let mut buf = vec![0u8; PART];
        loop {
            let n = file
                .read(&mut buf)
                .await
                .ctx(|| format!("reading {}", from.display()))?;
            if n == 0 {
                break;
            }
            parts
                .wait_for_capacity(PARTS_IN_FLIGHT)
                .await
                .map_err(|e| failed("writing", path, e))?;
            parts.write(&buf[..n]);
        }
        parts.finish().await.map_err(|e| failed("writing", path, e))?;
        Ok(())
    }

    /// Copy the object at `path` into the new file `to` as it streams in, fsynced.
    pub async fn get_file(&self, path: &str, to: &std::path::Path) -> Result<()> {
        use futures_util::StreamExt;
        use tokio::io::AsyncWriteExt;
        let got = self
            .store
            .get(&Path::from(path))
            .await
            .map_err(|e| failed("reading", path, e))?;
        let mut stream = got.into_stream();
        let mut file = tokio::fs::File::create(to)
            .await
            .ctx(|| format!("creating {}", to.display()))?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| failed("reading", path, e))?;
            file.write_all(&chunk)
                .await
                .ctx(|| format!("writing {}", to.display()))?;
        }
        file.sync_all().await.ctx(|| format!("syncing {}", to.display()))?;
        Ok(())
    }

    /// The object at `path`.
    pub async fn get(&self, path: &str) -> Result<Vec<u8>> {
        let got = self
            .store
            .get(&Path::from(path))
            .await
            .map_err(|e| failed("reading", path, e))?;
        Ok(got.bytes().await.map_err(|e| failed("reading", path, e))?.to_vec())
    }

    /// Delete the object at `path` (gone already: fine).
    pub async fn delete(&self, path: &str) -> Result<()> {
        match self.store.delete(&Path::from(path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(failed("deleting", path, e)),
        }
    }

    /// Delete every object under `prefix`.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<usize> {
        use futures_util::StreamExt;
        let listed: Vec<_> = self.store.list(Some(&Path::from(prefix))).collect().await;
        let mut n = 0;
        for meta in listed {
            let meta = meta.map_err(|e| failed("listing", prefix, e))?;
            self.store
                .delete(&meta.location)
                .await
                .map_err(|e| failed("deleting", meta.location.as_ref(), e))?;
            n += 1;
        }
        Ok(n)
    }
}
