"""``python -m node.demo``: the end-to-end demo on the repository's own demo/ data.

Wipes and re-creates the work folder (default ``runs/demo``), initialises three CT sites
(demo/site-a, site-b, site-c: three TCIA collections) and one MR site (demo/mr-t1c: Cheng's
T1c JPEGs with their patients.csv), ingests each and prints the summaries. The demo is a list
of stages (functions of a :class:`DemoContext`); later stages (train, round, comparison) are
appended to :data:`STAGES`. It needs nothing outside the repository (no ../shared).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.config import NodePaths, load_node_config
from node.home import init_home

__all__ = ["DemoSite", "DemoContext", "STAGES", "CT_SITES", "MR_SITES", "main"]

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "demo"
MARKER = ".synthfed-demo"


@dataclass(frozen=True)
class DemoSite:
    name: str
    sources: tuple[str, ...]  # relative to demo/
    modality: str | None = None
    patient_rule: str = "folder"  # 'csv:<file>' is relative to demo/
    plane: str | None = None


CT_SITES = (
    DemoSite("site-a", ("site-a",)),  # COVID-19-NY-SBU: 3 patients, one coronal file skipped
    DemoSite("site-b", ("site-b",)),  # TCGA-LUAD: 6 patients, implicit and explicit VR
    DemoSite("site-c", ("site-c",)),  # Pancreatic-CT-CBCT-SEG: one patient, split by slabs
)
MR_SITES = (
    DemoSite("site-mr", ("mr-t1c",), modality="MR", patient_rule="csv:mr-t1c/patients.csv"),
)


@dataclass
class DemoContext:
    workdir: Path
    data: Path = DEMO_DATA
    sites: dict[str, NodePaths] = field(default_factory=dict)  # CT sites, in order
    mr_sites: dict[str, NodePaths] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)  # stage name -> what it produced
    progress: bool = False

    def say(self, text: str = "") -> None:
        print(text, flush=True)


def _prepare_workdir(workdir: Path) -> None:
    """Wipe a previous demo folder; refuse to wipe anything that is not one."""
    if workdir.exists():
        if any(workdir.iterdir()) and not (workdir / MARKER).exists():
            raise SystemExit(
                f"error: {workdir} exists and is not a demo folder (no {MARKER}); "
                "choose another --workdir"
            )
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("created by python -m node.demo; wiped on the next run\n")


def stage_init(ctx: DemoContext) -> None:
    """Initialise one node home per site."""
    for group, target in ((CT_SITES, ctx.sites), (MR_SITES, ctx.mr_sites)):
        for site in group:
            target[site.name] = init_home(ctx.workdir / site.name, site.name)
    names = ", ".join([*ctx.sites, *ctx.mr_sites])
    ctx.say(f"initialised {len(ctx.sites) + len(ctx.mr_sites)} node homes: {names}")


def stage_ingest(ctx: DemoContext) -> None:
    """Ingest each site's demo data and print its summary."""
    from node.ingest import ingest_sources

    summaries: dict[str, dict[str, Any]] = {}
    for group, homes in ((CT_SITES, ctx.sites), (MR_SITES, ctx.mr_sites)):
        for site in group:
            paths = homes[site.name]
            rule = site.patient_rule
            if rule.startswith("csv:"):
                rule = "csv:" + str(ctx.data / rule[len("csv:"):])
            summary = ingest_sources(
                paths, load_node_config(paths), [ctx.data / s for s in site.sources],
                plane=site.plane, modality=site.modality, patient_rule=rule,
                progress=ctx.progress,
            )
            summaries[site.name] = summary.to_dict()
            ctx.say(f"\n== {site.name}: ingest {', '.join('demo/' + s for s in site.sources)}")
            ctx.say(summary.human())
    ctx.results["ingest"] = summaries


Stage = Callable[[DemoContext], None]
STAGES: list[tuple[str, Stage]] = [
    ("init", stage_init),
    ("ingest", stage_ingest),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node.demo", description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"),
                        help="work folder, wiped and re-created (default runs/demo)")
    parser.add_argument("--until", default=None,
                        help="stop after this stage (" + ", ".join(n for n, _ in STAGES) + ")")
    args = parser.parse_args(argv)
    if not (DEMO_DATA / "site-a").is_dir():
        raise SystemExit(f"error: demo data missing ({DEMO_DATA})")
    _prepare_workdir(args.workdir)
    ctx = DemoContext(workdir=args.workdir.resolve(), progress=sys.stderr.isatty())
    started = time.perf_counter()
    for name, stage in STAGES:
        t0 = time.perf_counter()
        stage(ctx)
        ctx.say(f"[stage {name} done in {time.perf_counter() - t0:.1f} s]")
        if name == args.until:
            break
    ctx.say(f"\ndemo finished in {time.perf_counter() - started:.1f} s; homes under {ctx.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
