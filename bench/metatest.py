"""Benchmark of the metatest service's recomputation: aggregation of one family over the 12 FPA
blocks, its products with and without PNG heat maps, a master-bias mosaic of full-size
frames, and the family-specific figures over 12 blocks (NL curves of 144 quadrants, crosstalk
matrices and the requirement figure, gain vs conditions). Run: ``.venv/bin/python bench/metatest.py [--mosaic-blocks N]``."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mosaic-blocks", type=int, default=1, help="blocks of full-size master biases (1; 0 skips)")
    args = parser.parse_args()
    from services.metatest.aggregate import ResultRecord, aggregate, gains_of, latest_per_test
    from services.metatest.families import FAMILIES
    from services.metatest.layout import fpa_layout
    from services.metatest.products import write_family_products
    from services.sim import results as simres

    layout = fpa_layout()
    events = simres.events(simres.simulate(simres.sim_blocks(12), ("PTC01", "BIAS01")))
    recs = [ResultRecord(e.block, e.test, 0, str(e.event_id), e.produced_at, e.results, e.products) for e in events]
    t = time.perf_counter()
    latest = latest_per_test(recs)
    res = aggregate(FAMILIES["ptc"], latest, gains_of(latest), layout)
    print(f"aggregate ptc over 12 blocks: {1e3 * (time.perf_counter() - t):.1f} ms ({len(res.quantities)} quantities)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_family_products(res, layout, root, figures=True)  # warm-up (matplotlib import)
        for figures in (False, True):
            t = time.perf_counter()
            write_family_products(res, layout, root, figures=figures)
            print(f"ptc products, figures={figures}: {time.perf_counter() - t:.2f} s")
        if args.mosaic_blocks:
            from astropy.io import fits

            from shared.geometry import Geometry

            shape = Geometry().shape
            blocks = layout.fpa_blocks[: args.mosaic_blocks]
            rng = np.random.default_rng(1)
            for b in blocks:
                for c in ("CCD1", "CCD2", "CCD3"):
                    path = root / b / "BIAS01" / f"master_bias_{c}.fits"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    arr = rng.standard_normal(shape, dtype=np.float32)
                    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(arr, name="STACK")]).writeto(path)
            bias = aggregate(FAMILIES["bias"], latest, gains_of(latest), layout)
            t = time.perf_counter()
            write_family_products(bias, layout, root, figures=False)
            n = 12 * len(blocks)
            print(f"bias products with a full-size master-bias mosaic of {len(blocks)} blocks ({n} quadrants): "
                  f"{time.perf_counter() - t:.2f} s (x{12 / len(blocks):.0f} for the full FPA)")
            t = time.perf_counter()
            write_family_products(bias, layout, root, figures=False)
            print(f"  again with the same inputs (mosaic skipped, same INPUTSIG): {time.perf_counter() - t:.2f} s")
        extras(layout, root)


def extras(layout, root: Path) -> None:
    """The family-specific products (services/metatest/extras.py) over the 12 FPA blocks."""
    from astropy.table import Table

    from services.metatest.aggregate import ResultRecord, aggregate, gains_of, latest_per_test
    from services.metatest.extras import QUADRANT_ORDER, extra_products
    from services.metatest.families import FAMILIES
    from shared.geometry import CCDS, QUADRANTS

    from datetime import datetime, timezone

    when = datetime(2026, 3, 1, tzinfo=timezone.utc)
    rng = np.random.default_rng(2)
    quads = [(c, q) for c in CCDS for q in QUADRANTS]
    recs = []
    for b in layout.fpa_blocks:
        path = root / b / "NL01" / "nl_curves.fits"
        path.parent.mkdir(parents=True, exist_ok=True)
        f = np.stack([np.linspace(100, 60000, 200)] * 12)
        Table({"ccd": [c for c, _ in quads], "quadrant": [q for _, q in quads], "fluence": f, "fluence_lin": f,
               "nl_pct": -1e-10 * f ** 2 * rng.uniform(0.8, 1.2, (12, 1))}).write(str(path), format="fits", overwrite=True)
        per_q = {c: {q: {"max_nl_pct": -0.3} for q in QUADRANTS} for c in CCDS}
        recs.append(ResultRecord(b, "NL01", 0, f"nl-{b}", when, per_q, []))
        xt = {s: {v: float(rng.uniform(1e-7, 2e-5)) for v in QUADRANT_ORDER if v != s} for s in QUADRANT_ORDER}
        recs.append(ResultRecord(b, "PSF01_800", 0, f"psf-{b}", when, {**per_q, "crosstalk": xt}, []))
        for k, t in enumerate(("PTC01", "PTC02_590", "PTC02_880", "PTC02_150K", "PTC02_15.5R", "PTC02_16.5R")):
            g = {c: {q: {"gain": 3.2 + 0.01 * k} for q in QUADRANTS} for c in CCDS}
            recs.append(ResultRecord(b, t, 0, f"{t}-{b}", when, g, []))
    latest = latest_per_test(recs)
    for family in ("nl", "psf", "ptc"):
        res = aggregate(FAMILIES[family], latest, gains_of(latest), layout)
        out = root / "FPA" / family
        out.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        paths = extra_products(res, layout, root, out)
        print(f"{family} extra products over 12 blocks ({len(paths)} files): {time.perf_counter() - t:.2f} s")
        t = time.perf_counter()
        extra_products(res, layout, root, out)
        print(f"  again, same inputs (per-block figures kept: same InputSig): {time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
