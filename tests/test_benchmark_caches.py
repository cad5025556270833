"""The benchmarks' on-disk caches load without running code: a planted file is refused."""

from __future__ import annotations

import pathlib

import pytest
import torch

from helpers import load_benchmark
from lipnet import data as D


class _Planted:
    """Unpickling this runs ``marker.touch()`` -- what a malicious cache file would do."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_a_planted_feature_cache_file_runs_no_code(tmp_path):
    bench = load_benchmark("privacy")
    ds = D.ImageDataset(torch.randint(0, 255, (4, 1, 28, 28), dtype=torch.uint8), torch.tensor([0, 1, 2, 3]),
                        D.DATASETS["mnist"])
    cfg = {"J": 2, "L": 8, "input_radius": 1.0}
    bench.FEATURE_CACHE = str(tmp_path)
    digest = f"{ds.info.name}-{len(ds)}-{bench.hash_images(ds)}-J2-L8-r1.0"
    marker = tmp_path / "code-ran"
    torch.save(_Planted(marker), tmp_path / f"scatter-{digest}.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|global"):
        bench.scatter_features(ds, cfg)
    assert not marker.exists()

    (tmp_path / f"scatter-{digest}.pt").unlink()  # an honest cache round-trips
    features, bound = bench.scatter_features(ds, cfg)
    bench._FEATURES.clear()
    again, bound_again = bench.scatter_features(ds, cfg)
    assert torch.equal(again.features, features.features) and bound_again == bound
