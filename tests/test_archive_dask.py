"""Counting an archive on a Dask cluster: equal to the in-process count bit for bit, exact under worker loss.

One 2-worker LocalCluster (processes, loopback) serves the whole module.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import xarray as xr

from moetrace.counting import count, load_counts
from moetrace.synthetic import TraceSpec
from test_archive import STATS, make_store

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                       dashboard_address=None)
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    make_store(root / "a.zarr", 0, 1000)
    make_store(root / "b.zarr", 1300, 900, rename={"dates": "history"})
    make_store(root / "c.zarr", 2500, 500)
    return root


@pytest.mark.parametrize("by, filters", [
    ([], {}),
    (["domain", "lang"], {}),
    (["domain"], {"skip_shared_prefix": True}),
    (["lang"], {"generated_only": True, "positions": (3, 30)}),
])
def test_cluster_equals_in_process(client, archive, by, filters):
    stats = [*STATS, "pairs", "coact"]
    local = count(archive, stats=stats, by=by, progress=False, **filters)
    on_cluster = count(archive, stats=stats, by=by, progress=False, client=client, range_rows=256, **filters)
    xr.testing.assert_identical(local, on_cluster)  # values, dtypes, coordinates and attributes
    for v in local.data_vars:
        assert local[v].values.tobytes() == on_cluster[v].values.tobytes()


def test_cluster_single_store_equals_count(client, archive):
    one = archive / "a.zarr"
    xr.testing.assert_identical(count(one, stats=STATS, progress=False),
                                count(one, stats=STATS, progress=False, client=client, range_rows=256))


def test_cluster_with_checkpoint(client, archive, tmp_path):
    kw = dict(stats=STATS, by=["domain"], progress=False, range_rows=256)
    local = count(archive, **kw)
    xr.testing.assert_identical(local, count(archive, client=client, checkpoint=tmp_path / "ck", **kw))
    assert len(list((tmp_path / "ck").glob("range-*.zarr"))) == 10
    xr.testing.assert_identical(local, count(archive, client=client, checkpoint=tmp_path / "ck", **kw))


def test_cli_scheduler(client, archive, tmp_path):
    out = tmp_path / "out.zarr"
    res = subprocess.run([sys.executable, "-m", "moetrace.cli", "count", str(archive), str(out), "--stats",
                          ",".join(STATS), "--by", "domain", "--scheduler", client.scheduler.address,
                          "--range-rows", "512", "--quiet"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    xr.testing.assert_identical(load_counts(out), count(archive, stats=STATS, by=["domain"], progress=False))


@pytest.mark.slow
def test_cli_workers(archive, tmp_path):
    out = tmp_path / "out.zarr"
    res = subprocess.run([sys.executable, "-m", "moetrace.cli", "count", str(archive / "*.zarr"), str(out),
                          "--stats", "experts,temporal", "--workers", "2", "--range-rows", "256", "--quiet"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    xr.testing.assert_identical(load_counts(out), count(archive, stats=["experts", "temporal"], progress=False))


def test_worker_killed_mid_count(client, tmp_path):
    """SIGKILL one worker process after the first ranges finished; the nanny restarts it, lost ranges are recomputed."""
    # 250 ranges: enough that the count is still running when the first 5 have finished, on a fast machine too
    spec = TraceSpec(n_tokens=64_000, n_layers=3, n_experts=8, top_k=2, seq_len=37)
    for i in range(2):
        make_store(tmp_path / f"s{i}.zarr", i * 32_000, 32_000, spec=spec, chunk_rows=256)
    kw = dict(stats=["experts", "temporal", "weight_sum"], by=["domain"], progress=False, range_rows=256)
    local = count(tmp_path, **kw)
    pids = client.run(os.getpid)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(ds=count(tmp_path, client=client, **kw)))
    worker.start()

    def finished_ranges(dask_scheduler=None):
        return sum(ts.state == "memory" for k, ts in dask_scheduler.tasks.items() if "_count_task" in str(k))

    deadline = time.monotonic() + 60
    while client.run_on_scheduler(finished_ranges) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.is_alive(), "the count ended before a worker could be killed"
    victim = sorted(pids.values())[0]
    os.kill(victim, signal.SIGKILL)
    worker.join(120)
    assert not worker.is_alive()
    client.wait_for_workers(2, timeout=60)
    assert victim not in client.run(os.getpid).values()
    xr.testing.assert_identical(local, result["ds"])
    for v in local.data_vars:
        np.testing.assert_array_equal(local[v].values, result["ds"][v].values)


def test_cli_scheduler_unreachable(archive, tmp_path):
    """A --scheduler nobody listens at: exit 2 with one line naming it, after the connect timeout, no traceback."""
    import socket

    from moetrace.commands.count import SCHEDULER_TIMEOUT_S

    with socket.socket() as s:  # a loopback port that was free a moment ago, now closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    t = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "moetrace.cli", "count", str(archive), str(tmp_path / "out.zarr"),
                          "--scheduler", address, "--quiet"], capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and address in lines[0] and "cannot reach a Dask scheduler" in lines[0], res.stderr
    assert took < SCHEDULER_TIMEOUT_S + 20  # imports included, on a loaded machine
    assert not (tmp_path / "out.zarr").exists()
