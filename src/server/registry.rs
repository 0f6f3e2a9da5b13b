//! The galleries a server holds, by name: each one directory under `DATA/galleries/`,
//! one writer handle, and the current snapshot that searches read without locking out
//! writers.

use crate::error::{Error, IoContext, Result};
use crate::gallery::{Gallery, GalleryInfo, Snapshot};
use crate::template::Dtype;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// One served gallery.
pub struct GalleryEntry {
    pub name: String,
    writer: Mutex<Gallery>,
    snapshot: RwLock<Arc<Snapshot>>,
}

impl GalleryEntry {
    fn new(name: String, gallery: Gallery) -> GalleryEntry {
        let snapshot = RwLock::new(gallery.snapshot());
        GalleryEntry {
            name,
            writer: Mutex::new(gallery),
            snapshot,
        }
    }

    /// What searches read now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().expect("snapshot lock").clone()
    }

    /// Run a write; the new snapshot is published before this returns, so the very
    /// next search sees it.
    pub fn write<T>(&self, f: impl FnOnce(&mut Gallery) -> Result<T>) -> Result<T> {
        let mut g = self.writer.lock().expect("writer lock");
        let out = f(&mut g);
        *self.snapshot.write().expect("snapshot lock") = g.snapshot();
        out
    }

    /// Summary for GetGallery / ListGalleries.
    pub fn info(&self) -> Result<GalleryInfo> {
        self.writer.lock().expect("writer lock").info()
    }
}

/// All galleries, by name.
pub struct Registry {
    root: PathBuf,
    galleries: RwLock<BTreeMap<String, Arc<GalleryEntry>>>,
}

/// Check a gallery name: 1-64 of `[A-Za-z0-9_.-]`, not starting with a dot.
pub fn check_gallery_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "gallery name {name:?} must be 1-64 characters of letters, digits, '_', '.', '-', not starting with '.'"
        )))
    }
}

impl Registry {
    /// Open every gallery under `data_dir/galleries`.
    pub fn open(data_dir: &Path) -> Result<Registry> {
        let root = data_dir.join("galleries");
        std::fs::create_dir_all(&root).ctx(|| format!("creating {}", root.display()))?;
        let mut galleries = BTreeMap::new();
        for entry in std::fs::read_dir(&root).ctx(|| format!("listing {}", root.display()))? {
            let entry = entry.ctx(|| format!("listing {}", root.display()))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if name.starts_with(".dropped-") {
                // A drop that crashed after moving the gallery aside: finish it.
                tracing::info!(dir = %entry.path().display(), "removing a dropped gallery");
                std::fs::remove_dir_all(entry.path()).ctx(|| format!("removing {}", entry.path().display()))?;
                continue;
            }
            if check_gallery_name(&name).is_err() || !entry.path().is_dir() {
                continue;
            }
            let gallery = Gallery::open(&entry.path())?;
            tracing::info!(gallery = %name, rows = gallery.snapshot().live_rows(), "loaded gallery");
            galleries.insert(name.clone(), Arc::new(GalleryEntry::new(name, gallery)));
        }
        Ok(Registry {
            root,
            galleries: RwLock::new(galleries),
        })
    }

    /// A gallery by name, or NotFound.
    pub fn get(&self, name: &str) -> Result<Arc<GalleryEntry>> {
        self.galleries
            .read()
            .expect("registry lock")
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("gallery {name:?}")))
    }

    /// Every gallery.
    pub fn all(&self) -> Vec<Arc<GalleryEntry>> {
        self.galleries
            .read()
            .expect("registry lock")
            .values()
            .cloned()
            .collect()
    }

    /// Whether no gallery exists.
    pub fn is_empty(&self) -> bool {
        self.galleries.read().expect("registry lock").is_empty()
    }

    /// Create a new gallery.
    pub fn create(&self, name: &str, dim: usize, dtype: Dtype) -> Result<Arc<GalleryEntry>> {
        check_gallery_name(name)?;
        let mut map = self.galleries.write().expect("registry lock");
        if map.contains_key(name) {
            return Err(Error::AlreadyExists(format!("gallery {name:?}")));
        }
        let gallery = Gallery::create(&self.root.join(name), dim, dtype)?;
        let entry = Arc::new(GalleryEntry::new(name.to_owned(), gallery));
        map.insert(name.to_owned(), entry.clone());
        Ok(entry)
    }

    /// Drop a gallery and delete its files. Searches already running finish on their
    /// snapshot (the mapped files stay readable until they let go).
    pub fn drop_gallery(&self, name: &str) -> Result<()> {
        let entry = self
            .galleries
            .write()
            .expect("registry lock")
            .remove(name)
            .ok_or_else(|| Error::NotFound(format!("gallery {name:?}")))?;
        let dir = entry.writer.lock().expect("writer lock").dir().to_path_buf();
        // Move it aside first so a crash mid-delete never leaves a half gallery in place.
        let trash = self.root.join(format!(".dropped-{name}-{}", std::process::id()));
        std::fs::rename(&dir, &trash).ctx(|| format!("moving {} aside", dir.display()))?;
        crate::gallery::manifest::sync_dir(&self.root)?;
        std::fs::remove_dir_all(&trash).ctx(|| format!("removing {}", trash.display()))?;
        Ok(())
    }
}
