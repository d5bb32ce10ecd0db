"""Many virtual clients (issue 20, item 4): `scripts/bench/scale_clients.py` runs the real
simulation path and records memory per round; its per-client cost probes run Flower's own engine."""

from __future__ import annotations

import json
import subprocess
import time

import psutil
import pytest

from scripts.bench import scale_clients


def test_growth_is_the_percentage_change():
    assert scale_clients.growth(200.0, 210.0) == pytest.approx(5.0)
    assert scale_clients.growth(200.0, 190.0) == pytest.approx(-5.0)


def test_memory_rows_cover_the_server_and_the_workers_alive_throughout():
    def sample(server: float, workers: dict[str, float]):
        return {"server": {"rss": server, "uss": server / 2},
                "workers": {pid: {"rss": mib, "uss": mib / 2} for pid, mib in workers.items()}}

    samples = {1: sample(100.0, {"7": 50.0, "9": 60.0}), 10: sample(101.0, {"7": 51.0}),
               30: sample(104.0, {"7": 55.0, "8": 10.0})}
    rows = {what: (mib, change) for what, mib, change in
            scale_clients.memory_rows(samples, [1, 10, 30])}
    assert set(rows) == {"server RSS", "server USS", "worker 1 RSS", "worker 1 USS"}
    assert rows["server RSS"] == ([100.0, 101.0, 104.0], pytest.approx(4.0))
    assert rows["worker 1 USS"] == ([25.0, 25.5, 27.5], pytest.approx(10.0))


def test_run_overrides_sample_the_asked_clients_a_round():
    args = scale_clients.parse_args(["many", "--clients", "10000", "--per-round", "100",
                                     "--rounds", "30"])
    keys = dict(item.split("=", 1) for item in scale_clients.run_overrides(args).split())
    assert float(keys["fraction-fit"]) * 10_000 == 100
    assert keys["synthetic-num-users"] == "10000" and keys["num-server-rounds"] == "30"
    images = scale_clients.parse_args(["many", "--clients", "1000", "--model", "cnn-1m",
                                       "--dataset", "synthetic-images"])
    keys = dict(item.split("=", 1) for item in scale_clients.run_overrides(images).split())
    assert keys["model"] == "'cnn-1m'" and keys["synthetic-images-samples"] == "20000"
    assert "synthetic-num-users" not in keys


def test_ray_workers_are_found_by_title_below_this_process_only():
    worker = subprocess.Popen(["bash", "-c", f"exec -a {scale_clients.WORKER_TITLE} sleep 30"])
    other = subprocess.Popen(["sleep", "30"])
    try:
        me = psutil.Process()
        deadline = time.monotonic() + 10  # wait for bash's exec to set the title
        while (scale_clients.WORKER_TITLE not in " ".join(psutil.Process(worker.pid).cmdline())
               and time.monotonic() < deadline):
            time.sleep(0.01)
        found = [p.pid for p in scale_clients.ray_workers(me)]
        assert found == [worker.pid]
        sample = scale_clients.memory_sample(me)
        assert list(sample["workers"]) == [str(worker.pid)]
        assert sample["server"]["rss"] >= sample["server"]["uss"] > 0
    finally:
        for proc in (worker, other):
            proc.kill()
            proc.wait()


def test_dispatch_cost_sweeps_flowers_link_state_with_the_messages_stored(identity):
    cost = scale_clients.dispatch_cost(40, 10)
    assert cost["nodes"] == 40 and cost["stored"] == 10
    assert cost["sweep_seconds"] > 0 and cost["sweep_cpu_seconds"] > 0
    assert cost["per_pair_cpu_us"] == pytest.approx(1e6 * cost["sweep_cpu_seconds"] / 400)
    assert cost["per_node_cpu_us"] == pytest.approx(1e6 * cost["sweep_cpu_seconds"] / 40)


def test_node_memory_and_data_cost_are_per_client(identity):
    memory = scale_clients.node_memory(50)
    assert memory["nodes"] == 50
    assert all(memory[key] > 0 for key in
               ("link_state_bytes", "run_info_store_bytes", "client_manager_bytes"))
    data = scale_clients.data_cost("synthetic", 30)
    assert data["clients"] == 30
    # at most 100 samples of 60 features a user (float64 at most), its labels and test part
    assert 0 < data["bytes_per_client"] <= 100 * 61 * 8 * 2
    assert data["partition_load_seconds"] > 0
    images = scale_clients.data_cost("synthetic-images", 30)
    assert 20 * 32 * 32 * 3 * 4 <= images["bytes_per_client"]  # 20 float32 images a client


@pytest.mark.slow
def test_many_clients_run_records_rounds_and_memory_at_each(tmp_path, capsys):
    out = tmp_path / "many.json"
    scale_clients.main(["many", "--clients", "30", "--per-round", "6", "--rounds", "3",
                        "--at", "1", "3", "--json", str(out)])
    result = json.loads(out.read_text(encoding="utf-8"))
    assert sorted(result["round_seconds"]) == ["1", "2", "3"]
    assert sorted(result["memory"]) == ["0", "1", "2", "3"]
    for sample in result["memory"].values():
        assert sample["server"]["rss"] > 0 and sample["workers"]  # Ray's ClientApp actors
    assert result["startup_seconds"] > 0 and len(result["accuracy"]) == 4
    assert result["client_fit_seconds"]["training"] > 0  # history's fit.timing, per client
    printed = capsys.readouterr().out
    assert "30 clients, 6 a round, 3 rounds" in printed
    assert "| server RSS |" in printed and "| worker 1 RSS |" in printed
