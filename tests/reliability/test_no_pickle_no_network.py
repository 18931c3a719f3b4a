"""Nothing is ever unpickled and nothing is fetched from the network.

Statically: every np.load in edge_build passes allow_pickle=False and no module imports a
pickle-based loader or a network client. Dynamically: pickles disguised as the files
edge-build loads (.npz feature shards and splits, .npy, .ckpt, .onnx) are refused without
running their payload; a build step runs with internet sockets refused; and the
reference build itself ran in a network namespace of its own (or with sockets refused).
"""

from __future__ import annotations

import ast
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from harness import NO_NETWORK, REPO, UNSHARE, Reference, all_args
from pickle_payload import evil_npy, evil_npz, evil_pickle

from edge_build.errors import EdgeBuildError
from edge_build.features import FeatureStore, _read_split
from edge_build.hashing import sha256_bytes

pytestmark = pytest.mark.reliability

SOURCES = sorted((REPO / "edge_build").rglob("*.py"))
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "torch"}
NETWORK_MODULES = {
    "socket", "ssl", "urllib.request", "urllib3", "requests", "httpx", "aiohttp", "http.client", "ftplib",
    "smtplib", "xmlrpc.client", "huggingface_hub", "modelscope",
}  # fmt: skip


def _calls(tree: ast.AST, dotted: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(dotted):
            yield node


def _imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_every_np_load_refuses_pickles_and_no_pickle_loader_is_imported():
    loads = 0
    for path in SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        for call in _calls(tree, "np.load"):
            loads += 1
            flags = {kw.arg: kw.value for kw in call.keywords}
            assert "allow_pickle" in flags, f"{path.name}:{call.lineno}: np.load without allow_pickle=False"
            assert isinstance(flags["allow_pickle"], ast.Constant) and flags["allow_pickle"].value is False
        for bad in ("pickle.load", "pickle.loads", "read_pickle", "yaml.load", "torch.load", "np.fromstring"):
            assert not list(_calls(tree, bad)), f"{path.name}: calls {bad}"
        imported = {name.split(".")[0] for name in _imports(tree)} | _imports(tree)
        assert not imported & PICKLE_MODULES, f"{path.name} imports {imported & PICKLE_MODULES}"
        assert "allow_pickle=True" not in path.read_text(), path.name
    assert loads >= 3  # the scan did find the loaders


def test_no_module_imports_a_network_client():
    for path in SOURCES:
        imported = _imports(ast.parse(path.read_text(), str(path)))
        assert not imported & NETWORK_MODULES, f"{path.name} imports {imported & NETWORK_MODULES}"
        assert "urlopen" not in path.read_text(), path.name


def _split_arrays(rows: int = 3) -> dict[str, np.ndarray]:
    return {
        "features": np.zeros((rows, 4), np.float32),
        "labels": np.zeros(rows, np.int64),
        "keys": np.asarray(["k"] * rows),
        "sha256": np.asarray(["s"] * rows),
        "pixel_sha256": np.asarray(["p"] * rows),
        "phash": np.zeros(rows, np.uint64),
        "dhash": np.zeros(rows, np.uint64),
    }


def test_pickles_disguised_as_feature_files_are_refused_unrun(tmp_path):
    marker = tmp_path / "PWNED"
    disguises = {
        "raw pickle": evil_pickle(marker),
        "npy holding a pickled object array": evil_npy(marker),
        "npz holding pickled object arrays": evil_npz(marker, **_split_arrays()),
    }
    for name, data in disguises.items():
        split = tmp_path / "train.npz"
        split.write_bytes(data)
        with pytest.raises(EdgeBuildError, match="unreadable feature file") as error:
            _read_split(split, "train")
        assert str(split) in str(error.value), name
        # A cache shard named by its own hash passes the name check: the loader itself must refuse it.
        store = FeatureStore(tmp_path / "cache")
        store.directory.mkdir(exist_ok=True)
        (store.directory / f"{sha256_bytes(data)}.npz").write_bytes(data)
        assert store.load() == {} and len(store.damaged) == 1, name
    assert not marker.exists(), "a pickle payload ran"


def test_feature_map_store_refuses_pickles_unrun(tmp_path):
    from edge_build.feature_maps import MapStore

    marker = tmp_path / "PWNED"
    store = MapStore(tmp_path / "maps")
    store.directory.mkdir()
    for data in (evil_pickle(marker), evil_npz(marker, entry=np.asarray(["a"]), maps=np.zeros((1, 1, 1, 1)))):
        (store.directory / f"{sha256_bytes(data)}.npz").write_bytes(data)
    assert store.load() == {} and len(store.damaged) == 2
    assert not marker.exists()


def test_internet_sockets_are_really_refused_by_the_suites_wrappers():
    probe = "import socket; socket.create_connection(('192.0.2.1', 80), timeout=3)"
    banned = subprocess.run(
        [sys.executable, "-c", f"import runpy; runpy.run_path({str(NO_NETWORK)!r}); {probe}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert banned.returncode != 0 and "network access attempted" in banned.stderr
    if UNSHARE:
        isolated = subprocess.run(["unshare", "-n", sys.executable, "-c", probe], capture_output=True, timeout=60)
        assert isolated.returncode != 0


@pytest.mark.slow
def test_a_build_runs_in_process_with_sockets_refused(reference: Reference, tmp_path, monkeypatch):
    """`edge-build all` on a complete build: doctor, every stage's checks, bundle, manifest, report."""
    import socket

    from click.testing import CliRunner

    from edge_build import bundle
    from edge_build.cli import main

    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    for name in ("socket", "create_connection", "getaddrinfo", "gethostbyname"):
        monkeypatch.setattr(socket, name, refuse)
    build, dist = reference.copy(tmp_path)
    args = [str(a) for a in all_args(build, dist)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert bundle.check_bundle(dist / "lite").ok


@pytest.mark.slow
def test_the_reference_build_ran_offline(reference: Reference):
    if reference.run is None:
        pytest.skip("reference reused from RELIABILITY_REFERENCE")
    manifest = json.loads((reference.dist / "lite" / "manifest.json").read_text())
    assert manifest["metrics"]["parity"] == "pass"
    assert reference.run.returncode == 0
    print("reference build:", "own network namespace (unshare -n)" if UNSHARE else "internet sockets refused")


def test_npy_loader_semantics_this_suite_relies_on(tmp_path):
    """np.load(allow_pickle=False) refuses both a raw pickle and a pickled object array without running them."""
    marker = tmp_path / "PWNED"
    for data in (evil_pickle(marker), evil_npy(marker)):
        with pytest.raises(ValueError):
            np.load(io.BytesIO(data), allow_pickle=False)
    assert not marker.exists()
