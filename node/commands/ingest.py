"""``synthfed-node ingest``: read DICOM / PNG / JPEG / NIfTI sources into the site store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from node.commands.options import HomeOption, JsonOption
from protocols.cli_support import emit


def register(app: typer.Typer) -> None:
    @app.command("ingest")
    def ingest_command(
        sources: Annotated[
            list[Path], typer.Argument(help="DICOM files or folders (recursive), PNG / JPEG"
                                       " folders, NIfTI volumes; read-only", show_default=False)
        ],
        home: HomeOption = None,
        json_out: JsonOption = False,
        plane: Annotated[
            str | None,
            typer.Option("--plane", help="axial | sagittal | coronal | any (default: node.yaml"
                         " store.plane); slices of other planes are skipped"),
        ] = None,
        modality: Annotated[
            str | None,
            typer.Option("--modality", help="CT | MR | PT: required for PNG / JPEG / NIfTI;"
                         " for DICOM keeps only that modality"),
        ] = None,
        patient_rule: Annotated[
            str,
            typer.Option("--patient-rule", help="patient of a PNG / JPEG / NIfTI file: folder"
                         " (parent folder), pattern:<regex with a group> or csv:<path> (columns"
                         " file, patient_id[, label])"),
        ] = "folder",
        label_column: Annotated[
            str | None,
            typer.Option("--label-column", help="CSV column stored as the slice label"
                         " (default: 'label' when present)"),
        ] = None,
        patient_merge: Annotated[
            str | None,
            typer.Option("--patient-merge", help="regex with a group: a PNG / JPEG / NIfTI"
                         " patient id matching it in full is replaced by the group (merges"
                         " ids that may be one person, e.g. '^(MR\\d+)[A-Z]$')"),
        ] = None,
        no_progress: Annotated[
            bool, typer.Option("--no-progress", help="no progress bar on stderr")
        ] = False,
    ) -> None:
        """Ingest SOURCES into the store; prints files, slices, patients, series, skips.

        SOURCES: DICOM files / folders (recursive), PNG / JPEG folders, NIfTI; only read.
        """
        from node.config import load_node_config, resolve_home
        from node.ingest import ingest_sources

        paths = resolve_home(home)
        config = load_node_config(paths)
        summary = ingest_sources(
            paths, config, sources, plane=plane, modality=modality,
            patient_rule=patient_rule, label_column=label_column, patient_merge=patient_merge,
            progress=not no_progress,
        )
        emit(json_out, summary.to_dict(), summary.human())
