//! The catalogue: CreateGallery, DropGallery, ListGalleries, CompactGallery, and
//! each gallery's info with its shards' health.

use super::*;

/// How long CreateGallery waits for every shard to have a serving replica.
const CREATE_WAIT: Duration = Duration::from_secs(15);

impl Router {
    /// A gallery's info: the catalogue, the counts of one serving replica per shard,
    /// and every shard's health.
    pub(super) async fn info(&self, g: &str, auth: &Authorization) -> std::result::Result<proto::GalleryInfo, Status> {
        self.current_view(&[g]).await?;
        let meta = self.meta_confirmed(g).await?;
        let mut info = proto::GalleryInfo {
            name: g.to_owned(),
            dim: meta.dim as u32,
            dtype: meta.dtype.name().to_owned(),
            shards: meta.shards,
            replicas: meta.replicas,
            state: "SERVING".into(),
            ..Default::default()
        };
        let mut unserved = Vec::new();
        for s in 0..meta.shards {
            let health = self.state(|st| shard_health(st, g, s));
            match self
                .on_replica(g, meta.created_ms, s, |mut client, read| {
                    let r = read.request(
                        proto::GetGalleryRequest {
                            name: read.local.clone(),
                        },
                        auth,
                    );
                    async move { client.get_gallery(r).await.map(Response::into_inner) }
                })
                .await
            {
                Ok(part) => {
                    info.rows += part.rows;
                    info.subjects += part.subjects;
                    info.bytes += part.bytes;
                    if info.backend.is_empty() {
                        info.backend = part.backend;
                    }
                }
                Err(e) => unserved.push(format!("shard {s}: {}", e.message())),
            }
            info.shard_health.push(health);
        }
        if !unserved.is_empty() {
            info.state = "NOT_SERVING".into();
            info.reason = unserved.join("; ");
        }
        Ok(info)
    }

    pub(super) async fn routed_create_gallery(
        &self,
        request: Request<proto::CreateGalleryRequest>,
    ) -> std::result::Result<proto::GalleryInfo, Status> {
        let auth = self.authorize(&request, Role::Admin, "CreateGallery")?;
        let caller = self.auth.name_of(&request).unwrap_or_else(|| "anonymous".into());
        let req = request.into_inner();
        crate::server::registry::check_gallery_name(&req.name)
            .map_err(|e| Status::invalid_argument(format!("name: {e}")))?;
        if req.name.len() > keys::MAX_GALLERY_NAME {
            return Err(Status::invalid_argument(format!(
                "name: a cluster's gallery name is at most {} characters",
                keys::MAX_GALLERY_NAME
            )));
        }
        if !req.source.is_empty() || !req.subjects.is_empty() {
            return Err(Status::invalid_argument(
                "source: a cluster's galleries are not derived yet",
            ));
        }
        if !req.expires_at.is_empty() {
            return Err(Status::invalid_argument(
                "expires_at: a cluster's galleries do not expire yet",
            ));
        }
        check_dim(req.dim as usize).map_err(|e| Status::invalid_argument(format!("dim: {e}")))?;
        let dtype = Dtype::ALL
            .into_iter()
            .find(|d| d.name() == req.dtype)
            .ok_or_else(|| Status::invalid_argument(format!("dtype: {:?} is not one of f32, f16, i8", req.dtype)))?;
        let shards = if req.shards == 0 { 1 } else { req.shards };
        if shards > keys::MAX_SHARDS {
            return Err(Status::invalid_argument(format!(
                "shards: {shards} is over {}",
                keys::MAX_SHARDS
            )));
        }
        let replicas = if req.replicas == 0 { 2 } else { req.replicas };
        if replicas > 16 {
            return Err(Status::invalid_argument(format!("replicas: {replicas} is over 16")));
        }
        // A node that just started may not be in the view yet: give it a moment.
        self.view
            .wait_for(Instant::now() + Duration::from_secs(5), |st| !st.nodes.is_empty())
            .await;
        let live = self.state(|st| st.live_nodes());
        if live.is_empty() {
            return Err(Status::unavailable("no shard server is live to hold the gallery"));
        }
        let meta = GalleryMeta {
            dim: req.dim as usize,
            dtype,
            shards,
            replicas,
            created_ms: crate::time_text::now_ms(),
            shard_hash: keys::ShardHash::Mixed,
        };
        let key = keys::gallery_key(&req.name);
        let mut ops = vec![etcd::put_op(&key, keys::encode(&meta), 0)];
        for s in 0..shards {
            let map = keys::ShardMap {
                replicas: keys::placement(&req.name, s, replicas, &live),
            };
            ops.push(etcd::put_op(&keys::shard_key(&req.name, s), keys::encode(&map), 0));
        }
        let txn = etcd::TxnRequest {
            compare: vec![etcd::absent(&key)],
            success: ops,
            failure: Vec::new(),
        };
        let created = self
            .etcd
            .txn(&format!("the creation of {}", req.name), txn)
            .await
            .map_err(status_of)?;
        if !created.succeeded {
            return Err(Status::already_exists(format!(
                "gallery: {:?} already exists",
                req.name
            )));
        }
        tracing::info!(%caller, gallery = %req.name, dim = req.dim, %dtype, shards, replicas, "created a cluster gallery");
        let name = req.name.clone();
        self.view
            .wait_for(Instant::now() + CREATE_WAIT, |st| {
                st.galleries.contains_key(&name) && (0..shards).all(|s| !st.serving(&name, s).is_empty())
            })
            .await;
        self.info(&req.name, &auth).await
    }

    pub(super) async fn routed_drop_gallery(
        &self,
        request: Request<proto::DropGalleryRequest>,
    ) -> std::result::Result<proto::DropGalleryResponse, Status> {
        self.authorize(&request, Role::Admin, "DropGallery")?;
        let caller = self.auth.name_of(&request).unwrap_or_else(|| "anonymous".into());
        let g = request.into_inner().name;
        let meta = self.meta_confirmed(&g).await?;
        let key = keys::gallery_key(&g);
        let txn = etcd::TxnRequest {
            compare: vec![etcd::absent(&key)],
            success: Vec::new(),
            // The gallery's own key exactly, and its folders: never a sibling's
            // (`fl` must not take `fl-2`), and no checkpoint left for a gallery made
            // again under the name.
            failure: vec![
                etcd::delete_op(&key),
                etcd::delete_prefix_op(&format!("{}{g}/", keys::SHARDS)),
                etcd::delete_prefix_op(&format!("{}{g}/", keys::LOG)),
                etcd::delete_prefix_op(&format!("{}{g}/", keys::VISIBLE)),
                etcd::delete_prefix_op(&format!("{}{g}/", keys::APPLIED)),
                etcd::delete_prefix_op(&format!("{}{g}/", keys::CHECKPOINTS)),
                etcd::delete_prefix_op(&format!("{}{g}/", keys::COMMITTED)),
            ],
        };
        let r = self
            .etcd
            .txn(&format!("the drop of {g}"), txn)
            .await
            .map_err(status_of)?;
        if r.succeeded {
            return Err(Status::not_found(format!("gallery: {g:?} does not exist")));
        }
        // Its objects: the nodes drop their replicas when they see the keys go.
        if let Some(url) = self.state(|st| st.store.clone()) {
            let prefix = keys::objects_prefix(&g, meta.created_ms);
            match Objects::open(&url) {
                Ok(objects) => {
                    if let Err(e) = objects.delete_prefix(&prefix).await {
                        tracing::warn!(gallery = %g, error = %e, "the dropped gallery's objects were not all deleted");
                    }
                }
                Err(e) => tracing::warn!(gallery = %g, error = %e, "the object store could not be opened"),
            }
        }
        tracing::info!(%caller, gallery = %g, "dropped a cluster gallery");
        Ok(proto::DropGalleryResponse {})
    }

    pub(super) async fn routed_list_galleries(
        &self,
        request: Request<proto::ListGalleriesRequest>,
    ) -> std::result::Result<proto::ListGalleriesResponse, Status> {
        let auth = self.authorize(&request, Role::Identify, "ListGalleries")?;
        let names: Vec<String> = self.state(|st| st.galleries.keys().cloned().collect());
        let mut galleries = Vec::with_capacity(names.len());
        for g in names {
            match self.info(&g, &auth).await {
                Ok(i) => galleries.push(i),
                Err(e) if e.code() == Code::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(proto::ListGalleriesResponse { galleries })
    }

    pub(super) async fn routed_compact_gallery(
        &self,
        request: Request<proto::CompactGalleryRequest>,
    ) -> std::result::Result<proto::CompactGalleryResponse, Status> {
        let auth = self.authorize(&request, Role::Admin, "CompactGallery")?;
        let g = request.into_inner().name;
        let meta = self.meta(&g)?;
        let mut total = proto::CompactGalleryResponse::default();
        for s in 0..meta.shards {
            // Every serving replica compacts; the counts are the first one's.
            for (i, (node, address)) in self.state(|st| st.serving(&g, s)).into_iter().enumerate() {
                let r = with_authorization(
                    proto::CompactGalleryRequest {
                        name: keys::replica_name(&g, s),
                    },
                    &auth,
                );
                let mut client = self.client(&address)?;
                // No deadline: a large shard's compaction may take long.
                let part = client
                    .compact_gallery(r)
                    .await
                    .map_err(|e| Status::new(e.code(), format!("shard {g}/{s} on {node}: {}", e.message())))?
                    .into_inner();
                if i > 0 {
                    continue;
                }
                total.rows_kept += part.rows_kept;
                total.rows_dropped += part.rows_dropped;
                total.segments_before += part.segments_before;
                total.segments_after += part.segments_after;
            }
        }
        Ok(total)
    }
}

/// A shard's health as the router sees it.
fn shard_health(st: &ClusterState, g: &str, s: u32) -> proto::ShardHealth {
    let key = (g.to_owned(), s);
    let serving: Vec<String> = st.serving(g, s).into_iter().map(|(n, _)| n).collect();
    let replicas = st.shard_map(g, s).map(|m| m.replicas.clone()).unwrap_or_default();
    proto::ShardHealth {
        shard: s,
        committed: st.committed.get(&key).copied().unwrap_or(0),
        visible: st.visible.get(&key).map_or(0, |v| v.0),
        replicas: replicas
            .iter()
            .map(|n| proto::ReplicaHealth {
                node: n.clone(),
                address: st.nodes.get(n).map(|i| i.address.clone()).unwrap_or_default(),
                live: st.nodes.contains_key(n),
                applied: st.applied.get(&key).and_then(|a| a.get(n)).copied().unwrap_or(0),
                serving: serving.contains(n),
            })
            .collect(),
    }
}
