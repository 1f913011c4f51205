"""build-cache --engine ray: the same cache as the local engine, incremental and resumable, and it survives a
killed actor; a two-node cluster on this machine for the multi-node path."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.cache.store import load_cache
from lookalike.pipeline.build import build_cache
from lookalike.pipeline.config import PipelineConfig
from tests.conftest import ASSETS, draw_shape

ray = pytest.importorskip("ray", reason="Ray Data is an optional extra: pip install -e '.[ray]'")
from lookalike.pipeline.engines.ray_engine import RayEngine

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One local Ray for the whole test run, sized as this machine (2 cores). Its workers start with this
    environment: offline, lookalike's folders in the test's temporary folder, the real weights where present."""
    base = tmp_path_factory.getbasetemp()
    env = {"HF_HUB_OFFLINE": "1", "LOOKALIKE_CONFIG_DIR": str(base / "config"),
           "LOOKALIKE_CACHE_DIR": str(base / "lookalike-cache"), "LOOKALIKE_WEIGHTS": str(ASSETS / "weights")}
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", object_store_memory=200 * 2**20,
             runtime_env={"env_vars": env})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def add_bad_files(root: Path) -> None:
    (root / "blue_squares" / "not_an_image.jpg").write_bytes(b"this is not a JPEG\n" * 20)
    Image.effect_noise((200, 200), 60).convert("RGB").save(root / "red_circles" / "whole.jpg")
    (root / "red_circles" / "truncated.jpg").write_bytes((root / "red_circles" / "whole.jpg").read_bytes()[:1500])
    (root / "red_circles" / "whole.jpg").unlink()


def assert_same_cache(a: Path, b: Path) -> None:
    first, second = load_cache(a), load_cache(b)
    assert first.manifest.fingerprint == second.manifest.fingerprint
    assert first.manifest.skipped == second.manifest.skipped
    assert first.manifest.default_policy == second.manifest.default_policy
    assert first.columns["paths"].tolist() == second.columns["paths"].tolist()
    for name in ("sizes", "mtimes", "labels", "classes"):
        np.testing.assert_array_equal(first.columns[name], second.columns[name], err_msg=name)
    np.testing.assert_allclose(first.columns["probs"], second.columns["probs"], atol=1e-6)
    np.testing.assert_allclose(first.columns["embeddings"], second.columns["embeddings"], atol=1e-5)


def test_ray_engine_builds_the_local_engines_cache_incrementally(ray_local, gallery, tiny_config, tmp_path):
    add_bad_files(gallery)
    local = build_cache(gallery, tmp_path / "local", tiny_config)
    remote = build_cache(gallery, tmp_path / "ray", tiny_config, engine=RayEngine(tiny_config))
    assert (remote.images, remote.embedded, remote.buckets) == (local.images, local.embedded, local.buckets) == \
        (18, 18, local.buckets)
    assert sorted(s["path"] for s in remote.skipped) == ["blue_squares/not_an_image.jpg", "red_circles/truncated.jpg"]
    assert_same_cache(tmp_path / "local", tmp_path / "ray")

    # Only new or changed images go to the cluster; a cache made by one engine is updated by the other.
    draw_shape(gallery / "red_circles" / "new.png", (220, 30, 30), "ellipse", seed=7)
    draw_shape(gallery / "blue_squares" / "0.png", (30, 60, 220), "rectangle", seed=8)
    for out, engine in ((tmp_path / "local", None), (tmp_path / "ray", RayEngine(tiny_config))):
        summary = build_cache(gallery, out, tiny_config, engine=engine)
        assert (summary.embedded, summary.reused, summary.images) == (2, 17, 19)
    assert_same_cache(tmp_path / "local", tmp_path / "ray")


def test_interrupted_ray_build_resumes_from_saved_chunks(ray_local, gallery, tiny_config, tmp_path, monkeypatch):
    engine = RayEngine(tiny_config, read_batch=4)  # batches of 4 come back one by one
    delivered = Counter()
    original = RayEngine.run

    def interrupted(self, paths, root, on_batch):
        def deliver(items):
            if sum(delivered.values()) >= 8:
                raise KeyboardInterrupt  # the driver stops; saved chunks stay
            delivered.update(item.path for item in items)
            on_batch(items)
        original(self, paths, root, deliver)

    monkeypatch.setattr(RayEngine, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_cache(gallery, tmp_path / "cache", tiny_config, engine=engine)
    assert not (tmp_path / "cache" / "CURRENT").exists()
    saved = sum(len(np.load(chunk)["paths"]) for chunk in (tmp_path / "cache" / "pending").glob("chunk-*.npz"))
    assert saved == 8  # what was delivered before the interrupt, all of it (the interrupt flushes)
    monkeypatch.setattr(RayEngine, "run", original)
    summary = build_cache(gallery, tmp_path / "cache", tiny_config, engine=engine)
    assert (summary.reused, summary.embedded, summary.images) == (saved, 18 - saved, 18)


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _model_actor_pids() -> list[int]:
    """This test run's model actor processes: Ray titles them after the actor class, and their parent is the
    raylet this process started (never another session's Ray)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and "_Models" in (proc / "cmdline").read_bytes().decode(errors="ignore") \
                    and _parent(_parent(int(proc.name))) == os.getpid():
                pids.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return pids


def test_killed_actor_is_replaced_and_every_image_embedded_once(ray_local, tiny_config, tmp_path):
    root = tmp_path / "gallery"
    paths = [str(draw_shape(root / f"{i:02d}.png", (30, 60, 220), "rectangle", seed=i).relative_to(root))
             for i in range(40)]
    delivered: Counter[str] = Counter()
    killed_after = []

    def on_batch(items):
        delivered.update(item.path for item in items if item.error is None and item.embedding is not None)
        if not killed_after:
            pids = _model_actor_pids()
            assert pids, "no model actor process found"
            os.kill(pids[0], signal.SIGKILL)
            killed_after.append(sum(delivered.values()))

    RayEngine(tiny_config, read_batch=4).run(paths, root, on_batch)
    assert killed_after and killed_after[0] < len(paths)  # killed while images were still to come
    assert delivered == Counter(paths)  # every image once: none lost, none twice


def test_a_worker_with_other_models_is_refused_in_one_line(ray_local, gallery, tiny_config, monkeypatch):
    from lookalike.models.errors import UserError

    engine = RayEngine(tiny_config)
    driver = engine.describe()
    monkeypatch.setattr(engine, "describe", lambda: {**driver, "embed": {"embedder": {"weights": "other"}}})
    with pytest.raises(UserError, match="a Ray worker's models differ from the driver's") as error:
        engine.run(["red_circles/0.png"], gallery, lambda items: None)
    assert "embed.embedder.weights: 'other' -> 'random'" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.real
def test_both_engines_agree_on_real_photos(ray_local, real_weights, tmp_path):
    from lookalike.pipeline.datasets import load_labelled

    data = load_labelled(ASSETS / "data" / "caltech101-22.zip")
    gallery = tmp_path / "gallery"
    for path in data.paths[::80]:  # 31 photos across the classes
        (gallery / path).parent.mkdir(parents=True, exist_ok=True)
        (gallery / path).symlink_to(data.root / path)
    config = PipelineConfig(classifier="mobilenetv2", embedder="mobilenetv2", device="cpu")
    build_cache(gallery, tmp_path / "local", config)
    build_cache(gallery, tmp_path / "ray", config, engine=RayEngine(config))
    local, remote = load_cache(tmp_path / "local"), load_cache(tmp_path / "ray")
    assert local.manifest.fingerprint == remote.manifest.fingerprint and len(local) == len(remote) >= 30
    assert local.columns["paths"].tolist() == remote.columns["paths"].tolist()
    cosine = np.sum(local.columns["embeddings"] * remote.columns["embeddings"], axis=1)
    assert cosine.min() >= 0.9999
    np.testing.assert_array_equal(local.columns["classes"], remote.columns["classes"])  # the same top-10


def test_two_node_cluster_builds_the_same_cache_through_the_cli(ray_local, gallery, tiny_config, tmp_path):
    """A head and a worker node (1 CPU each) on this machine, joined by a `cli.py build-cache` driver process:
    the model actor takes one node's CPU, so decoding runs on the other node."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_ADDRESS="")
        command = [sys.executable, str(ROOT / "cli.py"), "build-cache", "--gallery", str(gallery), "--out",
                   str(tmp_path / "ray"), "--engine", "ray", "--ray-address", cluster.address,
                   "--classifier", tiny_config.classifier, "--embedder", tiny_config.embedder, "--device", "cpu",
                   "--batch-size", "4"]
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "18 images in cache (18 embedded" in result.stdout
    finally:
        cluster.shutdown()
    build_cache(gallery, tmp_path / "local", tiny_config)
    assert_same_cache(tmp_path / "local", tmp_path / "ray")


def test_cli_refuses_a_ray_address_without_the_ray_engine(gallery, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "build-cache", "--gallery", str(gallery),
                             "--out", str(tmp_path / "c"), "--ray-address", "auto"],
                            capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 1 and result.stderr.strip() == "error: --ray-address needs --engine ray"


def test_speed_times_the_ray_engine_against_the_local_one(ray_local, gallery, tiny_config, tmp_path):
    from lookalike.pipeline.evaluation.speed import run_speed

    report = run_speed(gallery, tiny_config, queries=2, naive_images=2, cold_runs=1, reference_queries=0,
                       search_sizes=(), forward_seconds=0.2, workdir=tmp_path, engine="ray", camera_images=2)
    assert report["engine_build"]["engine"] == "ray" and report["engine_build"]["images"] == 18
    assert report["engine_vs_local"] > 0
    for engine in ("local", "ray"):
        figures = report["camera"][engine]
        assert figures["camera"]["images"] == figures["small"]["images"] == 2 and figures["camera_vs_small"] > 0


def test_a_refused_ray_build_prints_its_one_line_without_ray_tracebacks(gallery, tiny_config, tmp_path):
    """Ray's own logs (worker tracebacks, Ray Data's execution messages) stay in Ray's log folder, and what its C++
    core writes to the driver's stderr goes to lookalike's ray-driver.log."""
    script = ("import sys\n"
              "from lookalike.pipeline.engines.ray_engine import RayEngine\n"
              "real = RayEngine.describe\n"
              "RayEngine.describe = lambda self: {**real(self), 'embed': {'embedder': {'weights': 'other'}}}\n"
              "from lookalike.cli import main\n"
              "sys.argv = ['lookalike', *sys.argv[1:]]\n"
              "main()\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_ADDRESS="", PYTHONPATH=str(ROOT.parent))
    result = subprocess.run([sys.executable, "-c", script, "build-cache", "--gallery", str(gallery), "--out",
                             str(tmp_path / "ray"), "--engine", "ray", "--classifier", tiny_config.classifier,
                             "--embedder", tiny_config.embedder, "--device", "cpu"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and lines[-1].startswith("error: a Ray worker's models differ"), result.stderr[-3000:]
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr[-3000:]
