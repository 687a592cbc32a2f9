"""Kernel-estimate MSE (variance.py): iid matches its closed form; SimRF < ORF < iid, as Reid et al. prove."""
import math

import pytest
import torch

from common.random_features import favor_relative_variance
from srf_attention import variance


def test_iid_mse_matches_closed_form_and_simplex_beats_orthogonal_beats_iid():
    """d = 6, one block of m = 6 features, 32 pairs of norm 0.5, 4000 draws. Statements with their tolerance:
    the iid mean normalised MSE is within 4 standard errors of (exp|x+y|^2 - 1)/m (Performer Lemma 2); and
    SimRF < ORF < iid with each gap larger than 4 standard errors of the difference."""
    x, y = variance.sample_pairs(32, 6, 0.5, torch.Generator().manual_seed(0))
    stats = {}
    for feature_type in ("simplex", "orthogonal", "iid"):
        mse, stderr = variance.normalised_mse(feature_type, x, y, 6, 4000, torch.Generator().manual_seed(1))
        stats[feature_type] = (mse.mean().item(), stderr.pow(2).sum().sqrt().item() / 32)
    closed = favor_relative_variance(((x + y) ** 2).sum(-1), 6).mean().item()
    assert abs(stats["iid"][0] - closed) < 4 * stats["iid"][1], (stats, closed)
    for low, high in (("simplex", "orthogonal"), ("orthogonal", "iid")):
        gap = stats[high][0] - stats[low][0]
        assert gap > 4 * math.hypot(stats[high][1], stats[low][1]), (low, high, stats)


def test_script_writes_figure_and_csv(tmp_path):
    rows = variance.main(["--quick", "--pairs", "8", "--draws", "50", "--out", str(tmp_path)])
    assert {r["feature_type"] for r in rows} == {"simplex", "orthogonal", "iid"}
    assert (tmp_path / "srf_variance.png").stat().st_size > 1000
    assert (tmp_path / "srf_variance.csv").read_text().startswith("feature_type,norm,nb_features")


def test_feature_count_must_be_whole_blocks():
    x, y = variance.sample_pairs(2, 6, 0.5, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="multiple of the dimension d=6"):
        variance.kernel_estimates("simplex", x, y, 8, 10)
