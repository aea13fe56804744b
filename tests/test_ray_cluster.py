"""`guie embed --ray` on a 2-node `ray.cluster_utils.Cluster` (a head and a worker node, 1 CPU each, as two
machines would be): the output is local `guie embed`'s, every row once."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from guie.cli import app
from test_ray_embed import assert_same_as_local, job, patient_ray_start  # noqa: F401 - `job` is a fixture

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def two_nodes():
    """A head node and one worker node of 1 CPU each; this process is the driver."""
    from ray.cluster_utils import Cluster

    patient_ray_start()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_two_node_cluster_writes_the_local_output(two_nodes, job, tmp_path):  # noqa: F811
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    out = tmp_path / "two-nodes.parquet"
    # up to 2 model actors of half a CPU each, so that they and the decoding tasks spread over both nodes
    args = ["--ray", "auto", "--actors", "2", "--cpus-per-actor", "0.5", "--no-progress", "--batch-size", "2",
            "--shard-size", "4"]
    r = CliRunner().invoke(app, ["embed", str(job["folder"]), "-o", str(out), "--model", str(job["model"]), *args])
    assert r.exit_code == 0, r.output
    assert_same_as_local(out, job["local"])
