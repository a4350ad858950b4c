"""Site data ingest: DICOM, PNG / JPEG and NIfTI sources into the site store.

Sources are read-only; every slice is normalised onto the model grid with its mapping back to
physical units; patients, series and instances are known only by keyed pseudonyms.
"""

from node.ingest.pipeline import IngestSummary, ingest_sources, parse_patient_rule

__all__ = ["IngestSummary", "ingest_sources", "parse_patient_rule"]
