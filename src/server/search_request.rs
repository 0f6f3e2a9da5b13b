//! What one Identify (or one IdentifyStream message) asks to search, checked by one
//! function for both front ends: the server and the cluster's router.

use super::proto;
use tonic::Status;

/// Most galleries one Identify may search (a flight and a few watchlists).
pub const MAX_GALLERIES_PER_SEARCH: usize = 8;

/// A request naming several galleries: each with its own k and threshold (the
/// single-gallery fields left unset), at most [`MAX_GALLERIES_PER_SEARCH`], none twice.
pub fn check_several(
    gallery: &str,
    k: u32,
    threshold: Option<f32>,
    galleries: &[proto::GallerySearch],
) -> Result<(), Status> {
    if !gallery.is_empty() || k != 0 || threshold.is_some() {
        return Err(Status::invalid_argument(
            "galleries: with several galleries, give k and threshold per gallery and leave gallery, k and threshold unset",
        ));
    }
    if galleries.len() > MAX_GALLERIES_PER_SEARCH {
        return Err(Status::invalid_argument(format!(
            "galleries: {} galleries is more than the {MAX_GALLERIES_PER_SEARCH} allowed per request",
            galleries.len()
        )));
    }
    for (i, s) in galleries.iter().enumerate() {
        if let Some(j) = galleries[..i].iter().position(|t| t.gallery == s.gallery) {
            return Err(Status::invalid_argument(format!(
                "galleries[{i}]: gallery {} is also galleries[{j}]",
                super::registry::echo_name(&s.gallery)
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn search(g: &str) -> proto::GallerySearch {
        proto::GallerySearch {
            gallery: g.into(),
            k: 5,
            threshold: None,
        }
    }

    #[test]
    fn several_galleries_are_checked_once_for_both_front_ends() {
        let two = [search("a"), search("b")];
        assert!(check_several("", 0, None, &two).is_ok());
        for (gallery, k, threshold) in [("a", 0, None), ("", 3, None), ("", 0, Some(0.5))] {
            let e = check_several(gallery, k, threshold, &two).unwrap_err();
            assert!(e.message().contains("leave gallery, k and threshold unset"), "{e}");
        }
        let nine: Vec<_> = (0..9).map(|i| search(&format!("g{i}"))).collect();
        assert!(
            check_several("", 0, None, &nine)
                .unwrap_err()
                .message()
                .contains("9 galleries")
        );
        let e = check_several("", 0, None, &[search("a"), search("b"), search("a")]).unwrap_err();
        assert!(
            e.message().contains("galleries[2]") && e.message().contains("galleries[0]"),
            "{e}"
        );
    }
}
