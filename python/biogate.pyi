"""biogate: exact 1:N biometric identification, numpy in and out."""

from typing import Any, Optional

import numpy as np
import numpy.typing as npt

class Error(Exception):
    """Base class of biogate's errors (bad input raises ValueError)."""

class NotFoundError(Error):
    """A gallery or subject that does not exist."""

class CorruptError(Error):
    """Damage found in a gallery's files."""

class StorageError(Error):
    """The disk failed, or the gallery is locked or closed for writing."""

class GpuError(Error):
    """The GPU failed or is not there."""

class Gallery:
    """A gallery on disk (one directory), opened for reading and writing."""

    @staticmethod
    def create(path: str, dim: int, dtype: str = "f32") -> "Gallery":
        """An empty gallery for templates of `dim` values stored as "f32", "f16" or "i8"."""
    @staticmethod
    def open(path: str) -> "Gallery":
        """Open a gallery (its files are checked; damage raises CorruptError)."""
    @property
    def path(self) -> str: ...
    def enroll(self, subjects: list[str], templates: npt.ArrayLike) -> int:
        """One template per row (rows x dim) under subjects[i]; durable on return."""
    def delete(self, subject: str) -> None:
        """Delete a subject and its templates (NotFoundError if not enrolled)."""
    def identify(
        self,
        probes: npt.ArrayLike,
        k: int = 10,
        threshold: Optional[float] = None,
        backend: str = "auto",
    ) -> tuple[list[list[str]], npt.NDArray[np.float32], Optional[npt.NDArray[np.bool_]]]:
        """Per probe: the best k distinct subjects (best first), their scores
        (probes x k, NaN where there is no candidate) and, with a threshold, whether
        each probe matched. The GIL is released while searching."""
    def verify(self, probe: npt.ArrayLike, subject: str) -> Optional[float]:
        """The score of `probe` against `subject`'s best template, or None."""
    def info(self) -> dict[str, Any]:
        """What `biogate gallery info` prints."""
    def compact(self) -> None:
        """Seal the log and rewrite the live rows into one segment."""
    def eval(
        self,
        mated: npt.ArrayLike,
        mated_ids: list[str],
        nonmated: npt.ArrayLike,
        k: int = 20,
        rank: int = 1,
        backend: str = "auto",
    ) -> dict[str, Any]:
        """What `biogate eval` writes to report.json for this gallery."""
    def dedup(
        self,
        out: str,
        threshold: Optional[float] = None,
        top: Optional[int] = None,
        batch: int = 1024,
        backend: str = "auto",
    ) -> tuple[list[str], list[str], npt.NDArray[np.float32]]:
        """N:N de-duplication: pairs (subject_a, subject_b, scores), also written to `out`."""

def eval(
    path: str,
    mated: npt.ArrayLike,
    mated_ids: list[str],
    nonmated: npt.ArrayLike,
    k: int = 20,
    rank: int = 1,
    backend: str = "auto",
) -> dict[str, Any]:
    """`biogate eval` on the gallery at `path` (read-only): the report as a dict."""

def dedup(
    path: str,
    out: str,
    threshold: Optional[float] = None,
    top: Optional[int] = None,
    batch: int = 1024,
    backend: str = "auto",
) -> tuple[list[str], list[str], npt.NDArray[np.float32]]:
    """`biogate dedup` on the gallery at `path`: pairs, also written to `out`."""

def reads_in_place(array: npt.ArrayLike) -> bool:
    """Whether biogate reads `array` in place (float32, C order) rather than converting it."""

class Client:
    """A connection to a biogate server, with the same searches against its galleries."""

    def __init__(
        self,
        addr: str,
        token: Optional[str] = None,
        ca_cert: Optional[str] = None,
        client_cert: Optional[str] = None,
        client_key: Optional[str] = None,
        domain: Optional[str] = None,
    ) -> None: ...
    def identify(
        self, gallery: str, probes: npt.ArrayLike, k: int = 10, threshold: Optional[float] = None
    ) -> tuple[list[list[str]], npt.NDArray[np.float32], Optional[npt.NDArray[np.bool_]]]: ...
    def enroll(self, gallery: str, subjects: list[str], templates: npt.ArrayLike) -> int: ...
    def verify(self, gallery: str, probe: npt.ArrayLike, subject: str) -> float: ...
    def delete(self, gallery: str, subject: str) -> None: ...
    def galleries(self) -> list[str]: ...
