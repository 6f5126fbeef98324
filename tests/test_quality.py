"""benchmarks/quality.py --quick end to end: the report's shape, and t = 0 is the base."""

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import ON_MERGEKIT_015, REPO

CARD_FRACTIONS = [0.008, 0.02, 0.10, 0.18, 0.35, 0.55]


def check_family(family, domains):
    """One family's ladder: t = 0 then the card's six fractions, three stages each."""
    base = family["models"]["base"]["perplexity"]
    ladder = family["ladder"]
    assert len(ladder) == 1 + len(CARD_FRACTIONS)
    assert ladder[0]["t"] == 0.0
    assert [r["target_full_swap_fraction"] for r in ladder[1:]] == CARD_FRACTIONS
    for rung in ladder:
        assert math.isfinite(rung["t"]) and rung["t"] >= 0
        assert len(rung["full_swap_fraction"]) == 3
        assert all(0 <= f <= 1 for f in rung["full_swap_fraction"])
        assert set(rung["perplexity"]) == set(domains)
        assert isinstance(rung["sample"], str)
    # NearSwap with t = 0 keeps every weight of the base: not close, equal.
    for domain in domains:
        assert ladder[0]["perplexity"][domain] == base[domain], domain
    assert [o["method"] for o in family["others"]] == ["linear", "ties"]
    records = [family["models"]["base"], *family["models"]["children"], *ladder, *family["others"]]
    for record in records:
        assert set(record["perplexity"]) == set(domains)
        assert all(math.isfinite(p) and p > 1 for p in record["perplexity"].values())


@pytest.mark.slow
@pytest.mark.skipif(not ON_MERGEKIT_015, reason="the quality study runs on mergekit 0.1.5")
@pytest.mark.skipif(
    not (os.path.isdir("/usr/share/common-licenses") and os.path.isdir("/usr/share/doc")),
    reason="the study's corpora are Debian's licence and copyright texts",
)
def test_quick_quality_study(tmp_path):
    out = tmp_path / "quality.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--quick", "--quiet",
         "--out", str(out)],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    domains = report["domains"]
    assert len(domains) >= 3 and len(set(domains)) == len(domains)
    assert len(report["models"]["children"]) == 3
    assert all(c["name"] for c in report["models"]["children"])
    assert set(report["models"]["ancestor"]["perplexity"]) == set(domains)
    check_family(report, domains)
    check_family(report["contrast"], domains)
    # Both families share the base.
    assert report["contrast"]["models"]["base"] == report["models"]["base"]
    # `nearswap-mergekit ladder` on the same chain and texts, asked for the card's
    # fractions: the t calibrate found for the written merges, and their NLL.
    command = report["ladder_command"]
    assert command["rungs"] == 1 + len(CARD_FRACTIONS)
    assert command["same_t"]
    assert command["max_relative_nll_difference"] <= 1e-6
    assert out.with_suffix(".png").stat().st_size > 0
    assert "| nearswap |" in out.with_suffix(".md").read_text()
