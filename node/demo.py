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
    round_count: int = 16  # images asked of each site in the demo round

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


def _update_node_yaml(paths: NodePaths, section: str, values: dict[str, Any]) -> None:
    import yaml

    from protocols.files import atomic_write_text

    data = yaml.safe_load(paths.config.read_text())
    data[section].update(values)
    atomic_write_text(paths.config, yaml.safe_dump(data, sort_keys=False))


def stage_train(ctx: DemoContext) -> None:
    """Train a tiny latent diffusion generator at each CT site (a smoke test: 6 slices each)."""
    from node.generator.train import train_generator

    trained: dict[str, Any] = {}
    for name, paths in ctx.sites.items():
        _update_node_yaml(paths, "generator", {"preset": "tiny"})
        summary = train_generator(
            paths, load_node_config(paths), preset="tiny", progress=ctx.progress, quality=False
        )
        trained[name] = summary
        ctx.say(f"{name}: tiny generator trained in {summary.get('wall_s', 0):.0f} s")
    ctx.results["train"] = trained


def stage_round(ctx: DemoContext) -> None:
    """One pooling round over CT in Flower's simulation engine, with scripted approval.

    The reviewer approval is the demo switch ``--auto-approve-with``: each site gets a demo
    reviewer key, the coordinator policy explicitly allows demo-approved bundles, and every
    manifest records ``demo_auto_approved: true``. Never for real data.
    """
    from coordinator.home import init_coordinator_home, policy_set, trust_add
    from coordinator.simulate import simulate_round
    from protocols.files import atomic_write_json
    from protocols.keys import generate_keypair, load_public_key, write_keypair

    coordinator = init_coordinator_home(ctx.workdir / "coordinator", "demo-consortium")
    policy_file = ctx.workdir / "demo-policy.json"
    atomic_write_json(
        policy_file, {"required_reviewer_signatures": 1, "allow_demo_auto_approved": True}
    )
    policy_set(coordinator, policy_file)
    coordinator_key = load_public_key(coordinator.coordinator_pub).hex
    reviewer_files = []
    for name, paths in ctx.sites.items():
        reviewer = generate_keypair()
        key_file = ctx.workdir / f"{name}-demo-reviewer.ed25519"
        write_keypair(reviewer, key_file, ctx.workdir / f"{name}-demo-reviewer.pub")
        reviewer_files.append(key_file)
        _update_node_yaml(paths, "policy", {
            "coordinator_key": coordinator_key,
            "reviewer_keys": [reviewer.public.hex],
            "modalities_offered": ["CT"],
        })
        trust_add(coordinator, name, load_public_key(paths.site_pub), [reviewer.public])
    summary = simulate_round(
        coordinator, [p.root for p in ctx.sites.values()], "CT", ctx.round_count,
        auto_approve_keys=reviewer_files,
    )
    ctx.results["round"] = summary
    ctx.say(f"round {summary.get('round')}: simulation {summary['simulation_wall_s']:.1f} s")
    for site, entry in summary["sites"].items():
        reason = f" ({entry['reason']})" if entry.get("reason") else ""
        ctx.say(f"  {site}: {entry['state']}, {entry.get('n_images', 0)} images{reason}")
    ctx.say(
        f"pooled {summary['accepted_images']} guard-accepted synthetic images; "
        f"{summary['wire_bytes_per_accepted_image']} bytes on the wire per image; "
        f"pool at {summary.get('pool', '(none: no site verified)')}"
    )


def stage_compare(ctx: DemoContext) -> None:
    """The tiny comparison (machinery only): CT low-dose denoising, arms S R L F 0.

    Arm S trains on the round's pool (guard-accepted synthetic images of every verified site);
    the others on the sites' real train splits; every arm is evaluated at each site's own real
    holdout. Six slices per site and tiny generators: the figures are a smoke test.
    """
    from coordinator.restore.compare import (
        CompareConfig,
        SiteConfig,
        SyntheticConfig,
        run_comparison,
    )
    from coordinator.restore.report import summary_lines

    pool = ctx.results.get("round", {}).get("pool")
    config = CompareConfig(
        description="make demo: tiny CT denoising comparison on demo/ (machinery only)",
        task="denoise", modality="CT", preset="tiny", steps=40, batch_size=4,
        sites=[SiteConfig(name=n, home=str(p.root)) for n, p in ctx.sites.items()],
        synthetic=SyntheticConfig(source="pool" if pool else "none", pool=pool or ""),
        arms=["S", "R", "L", "F", "0"] if pool else ["R", "L", "F", "0"],
    )
    out = ctx.workdir / "comparison"
    results = run_comparison(config, out, progress=ctx.progress)
    ctx.results["compare"] = results
    ctx.say("tiny comparison (CT low-dose denoising; PSNR / SSIM on each site's real holdout):")
    for line in summary_lines(results):
        ctx.say("  " + line)
    ctx.say(f"report: {out / 'report.md'} and {out / 'report.html'}")


Stage = Callable[[DemoContext], None]
STAGES: list[tuple[str, Stage]] = [
    ("init", stage_init),
    ("ingest", stage_ingest),
    ("train", stage_train),
    ("round", stage_round),
    ("compare", stage_compare),
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
