"""Sharded embedding under torchrun: 2 gloo processes split the shards and give the single-process result."""
import os
import subprocess
import sys

import numpy as np
import pytest

from guie.embedding.files import read_embeddings
from train_fixtures import make_labelled_images


@pytest.mark.slow
def test_torchrun_embed_equals_single_process(tmp_path):
    manifest = make_labelled_images(tmp_path / "imgs", n_classes=10, per_class=4)
    common = ["embed", str(manifest), "--image-size", "32", "--shard-size", "6", "--no-progress", "--device", "cpu"]
    one = subprocess.run([sys.executable, "-m", "guie.cli", *common, "-o", str(tmp_path / "one.parquet")],
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--standalone", "-m", "guie.cli", *common, "-o", str(tmp_path / "two.parquet")],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote 40 embeddings") == 1  # rank 0 alone reports
    df1, e1 = read_embeddings(tmp_path / "one.parquet")
    df2, e2 = read_embeddings(tmp_path / "two.parquet")
    assert df1["path"].tolist() == df2["path"].tolist()
    np.testing.assert_allclose(e2, e1, atol=1e-5)
    assert not (tmp_path / "two.parquet.parts").exists()
