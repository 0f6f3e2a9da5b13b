//! Searches: every shard of each gallery on one serving replica (another if that
//! fails), the per-shard lists merged into the exact top-k; Identify, IdentifyStream
//! and Verify.

use super::*;

/// What a shard search returned: its answer, or why no replica gave one.
type ShardAnswer = std::result::Result<proto::IdentifyResponse, Status>;

fn merge_probe(parts: Vec<proto::ProbeResult>, k: usize, threshold: Option<f32>) -> proto::ProbeResult {
    let mut candidates: Vec<proto::Candidate> = parts.into_iter().flat_map(|p| p.candidates).collect();
    candidates.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.subject.cmp(&b.subject)));
    candidates.truncate(k);
    proto::ProbeResult {
        decided: threshold.is_some(),
        matched: threshold.is_some() && !candidates.is_empty(),
        candidates,
    }
}

/// One gallery of a search: its name, k and threshold.
struct Search {
    gallery: String,
    k: u32,
    threshold: Option<f32>,
}

impl Router {
    /// Search `probes` in every shard of each gallery and merge: one list of results per
    /// gallery, and the shards that could not be searched (only when `allow_partial`).
    async fn search(
        &self,
        searches: &[Search],
        probes: &[Vec<u8>],
        authorization: Authorization,
        allow_partial: bool,
    ) -> std::result::Result<(Vec<Vec<proto::ProbeResult>>, Vec<String>), Status> {
        let named: Vec<&str> = searches.iter().map(|s| s.gallery.as_str()).collect();
        self.current_view(&named).await?;
        let mut metas: Vec<GalleryMeta> = Vec::with_capacity(searches.len());
        for search in searches {
            let meta = self.meta(&search.gallery)?;
            // Each probe checked once per dimension (the nodes check it again).
            if !metas.iter().any(|m| m.dim == meta.dim) {
                for (i, p) in probes.iter().enumerate() {
                    decode_template(p, meta.dim, &format!("probes[{i}]"))?;
                }
            }
            metas.push(meta);
        }
        let mut calls = Vec::new();
        for (search, meta) in searches.iter().zip(&metas) {
            for s in 0..meta.shards {
                let request = proto::IdentifyRequest {
                    gallery: String::new(),
                    probes: probes.to_vec(),
                    k: search.k,
                    threshold: search.threshold,
                    ..Default::default()
                };
                let auth = authorization.clone();
                let g = search.gallery.clone();
                let created_ms = meta.created_ms;
                calls.push(async move {
                    self.on_replica(&g, created_ms, s, |mut client, read| {
                        let message = proto::IdentifyRequest {
                            gallery: read.local.clone(),
                            ..request.clone()
                        };
                        let r = read.request(message, &auth);
                        async move { client.identify(r).await.map(Response::into_inner) }
                    })
                    .await
                });
            }
        }
        let answers: Vec<ShardAnswer> = futures_util::future::join_all(calls).await;
        let mut answers = answers.into_iter();
        let mut out = Vec::with_capacity(searches.len());
        let mut missing = Vec::new();
        for (search, meta) in searches.iter().zip(&metas) {
            let mut per_probe: Vec<Vec<proto::ProbeResult>> = vec![Vec::new(); probes.len()];
            for s in 0..meta.shards {
                match answers.next().expect("one answer per shard") {
                    Ok(r) => {
                        for (slot, result) in per_probe.iter_mut().zip(r.results) {
                            slot.push(result);
                        }
                    }
                    Err(e) if allow_partial && e.code() == Code::Unavailable => {
                        missing.push(format!("{}/{s}", search.gallery));
                    }
                    Err(e) => return Err(e),
                }
            }
            out.push(
                per_probe
                    .into_iter()
                    .map(|parts| merge_probe(parts, search.k as usize, search.threshold))
                    .collect(),
            );
        }
        Ok((out, missing))
    }

    /// The searches a request names: one gallery, or several.
    fn searches_of(
        gallery: &str,
        k: u32,
        threshold: Option<f32>,
        galleries: &[proto::GallerySearch],
    ) -> std::result::Result<Vec<Search>, Status> {
        if galleries.is_empty() {
            if gallery.is_empty() {
                return Err(Status::invalid_argument("gallery: no gallery named"));
            }
            return Ok(vec![Search {
                gallery: gallery.to_owned(),
                k,
                threshold,
            }]);
        }
        crate::server::search_request::check_several(gallery, k, threshold, galleries)?;
        Ok(galleries
            .iter()
            .map(|g| Search {
                gallery: g.gallery.clone(),
                k: g.k,
                threshold: g.threshold,
            })
            .collect())
    }

    pub(super) async fn routed_identify(
        &self,
        request: Request<proto::IdentifyRequest>,
    ) -> std::result::Result<proto::IdentifyResponse, Status> {
        let auth = self.authorize(&request, Role::Identify, "Identify")?;
        let req = request.into_inner();

        no_encounters(&req.encounter)?;
        if req.probes.is_empty() {
            return Err(Status::invalid_argument("probes: no probes given"));
        }
        let searches = Router::searches_of(&req.gallery, req.k, req.threshold, &req.galleries)?;
        let (mut results, missing) = self.search(&searches, &req.probes, auth, req.allow_partial).await?;
        let mut response = proto::IdentifyResponse {
            partial: !missing.is_empty(),
            unavailable_shards: missing,
            ..Default::default()
        };
        if req.galleries.is_empty() {
            response.results = results.pop().unwrap_or_default();
        } else {
            response.galleries = searches
                .iter()
                .zip(results)
                .map(|(s, results)| proto::GalleryResults {
                    gallery: s.gallery.clone(),
                    results,
                })
                .collect();
        }
        Ok(response)
    }

    /// Each message searched in a task of its own and answered (and audited, one line
    /// each) as it completes.
    pub(super) fn routed_identify_stream(
        self: &Arc<Self>,
        request: Request<Streaming<proto::IdentifyStreamRequest>>,
        auth: Authorization,
        call: audit::RouterCall,
    ) -> Response<IdentifyStreamOut> {
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(256);
        let router = self.clone();
        let call = Arc::new(call);
        tokio::spawn(async move {
            while let Ok(Some(m)) = incoming.message().await {
                let router = router.clone();
                let tx = tx.clone();
                let auth = auth.clone();
                let call = call.clone();
                tokio::spawn(async move {
                    let answer = async {
                        no_encounters(&m.encounter)?;
                        let searches = Router::searches_of(&m.gallery, m.k, m.threshold, &m.galleries)?;
                        let (results, missing) = router
                            .search(&searches, std::slice::from_ref(&m.probe), auth, m.allow_partial)
                            .await?;
                        Ok::<_, Status>((searches, results, missing))
                    }
                    .await;
                    let mut out = proto::IdentifyStreamResponse {
                        request_id: m.request_id.clone(),
                        ..Default::default()
                    };
                    match answer {
                        Ok((searches, mut results, missing)) => {
                            out.partial = !missing.is_empty();
                            out.unavailable_shards = missing;
                            if m.galleries.is_empty() {
                                out.result = results.pop().and_then(|mut r| r.pop());
                            } else {
                                out.galleries = searches
                                    .iter()
                                    .zip(results)
                                    .map(|(s, mut r)| proto::GalleryResult {
                                        gallery: s.gallery.clone(),
                                        result: r.pop(),
                                    })
                                    .collect();
                            }
                        }
                        Err(e) => {
                            out.error_code = e.code() as i32;
                            out.error_message = e.message().to_owned();
                        }
                    }
                    let out = router.audit_stream_answer(&call, &m, out).await;
                    let _ = tx.send(Ok(out)).await;
                });
            }
        });
        Response::new(Box::pin(ReceiverStream::new(rx)))
    }

    pub(super) async fn routed_verify(
        &self,
        request: Request<proto::VerifyRequest>,
    ) -> std::result::Result<proto::VerifyResponse, Status> {
        let auth = self.authorize(&request, Role::Identify, "Verify")?;
        let req = request.into_inner();
        self.current_view(&[&req.gallery]).await?;
        let (meta, s) = self.subject_shard(&req.gallery, &req.subject)?;
        decode_template(&req.probe, meta.dim, "probe")?;
        let answer = self
            .on_replica(&req.gallery, meta.created_ms, s, |mut client, read| {
                let r = read.request(
                    proto::VerifyRequest {
                        gallery: read.local.clone(),
                        ..req.clone()
                    },
                    &auth,
                );
                async move { client.verify(r).await.map(Response::into_inner) }
            })
            .await?;
        Ok(answer)
    }
}
