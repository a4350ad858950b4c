"""The guard's reference: every real slice of the site (train and holdout), from the store.

Invariant 4 is about *every* real slice, so the reference is the whole store, whatever the
split; the split matters only to calibration (holdout patients play "new patients") and to
canaries (made from train slices). Patients are known by their store pseudonyms only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from node.config import NodePaths
from node.errors import StoreError
from node.store import SliceRecord, Store

__all__ = ["GuardReference", "load_reference", "reference_digest"]


@dataclass
class GuardReference:
    images: np.ndarray  # float32 [N, S, S], normalised, every slice of the store
    records: list[SliceRecord]
    digest: str  # which slices with which pixels (train and holdout)

    @property
    def patients(self) -> list[str]:
        return [r.patient for r in self.records]

    @property
    def splits(self) -> list[str]:
        return [r.split for r in self.records]

    @property
    def modalities(self) -> list[str]:
        return sorted({r.modality for r in self.records})

    def rows(self, modality: str | None = None, split: str | None = None) -> np.ndarray:
        return np.asarray(
            [
                i
                for i, r in enumerate(self.records)
                if (modality is None or r.modality == modality)
                and (split is None or r.split == split)
            ],
            dtype=np.int64,
        )


def load_reference(paths: NodePaths) -> GuardReference:
    """All slices of the store (stable order), refusing an empty store."""
    with Store(paths.store) as store:
        records = store.records()
        if not records:
            raise StoreError("the store is empty: ingest something before screening", "store")
        store.image_size()  # refuses mixed grids
        images = store.load(records)
        digest = reference_digest(store)
    return GuardReference(images=images, records=records, digest=digest)


def reference_digest(store: Store) -> str:
    """Which slices, with which pixels, in which split: from the catalog, no pixel read."""
    return hashlib.sha256(
        (store.split_digest("train") + ":" + store.split_digest("holdout")).encode()
    ).hexdigest()
