"""Weights download against a local HTTP server on loopback: checksum, cache, offline mode, truncation."""

import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import vision_moe
from vision_moe import hub

ROOT = Path(__file__).resolve().parents[1]


class _Handler(http.server.SimpleHTTPRequestHandler):
    truncate = False

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        if self.path.startswith("/truncated"):
            data = (Path(self.directory) / "w.safetensors").read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            return
        super().do_GET()


@pytest.fixture()
def server(tmp_path, monkeypatch):
    srv_dir = tmp_path / "srv"
    srv_dir.mkdir()
    torch.manual_seed(0)
    model = vision_moe.create_model("vit_mtl_tiny_patch16_224", img_size=32, depth=1, tasks=["t"], num_classes=0)
    save_file(model.state_dict(), str(srv_dir / "w.safetensors"))
    handler = lambda *a, **k: _Handler(*a, directory=str(srv_dir), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("VISION_MOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VISION_MOE_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    digest = hashlib.sha256((srv_dir / "w.safetensors").read_bytes()).hexdigest()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", digest, model
    httpd.shutdown()
    httpd.server_close()


def test_download_checks_sha256_and_loads(server):
    base, digest, model = server
    path = hub.download_url(f"{base}/w.safetensors", sha256=digest)
    assert path.parent == hub.cache_dir() and hub.sha256_file(path) == digest
    loaded = vision_moe.create_model(
        "vit_mtl_tiny_patch16_224",
        img_size=32,
        depth=1,
        tasks=["t"],
        num_classes=0,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
    )
    want = model.state_dict()
    assert loaded.state_dict().keys() == want.keys()
    for k, v in loaded.state_dict().items():  # every tensor came from the downloaded file
        assert torch.equal(v, want[k]), k


def test_wrong_checksum_raises_and_leaves_nothing(server):
    base, _, _ = server
    with pytest.raises(ValueError, match="checksum mismatch.*expected sha256 0{64}, got [0-9a-f]{64}"):
        hub.download_url(f"{base}/w.safetensors", sha256="0" * 64)
    assert not list(hub.cache_dir().iterdir())  # neither the file nor a .part left behind


def test_truncated_download_raises(server):
    base, _, _ = server
    with pytest.raises(OSError, match="truncated"):
        hub.download_url(f"{base}/truncated", filename="t.safetensors")
    assert not (hub.cache_dir() / "t.safetensors").exists()


def test_cache_reused_and_offline_mode(server, monkeypatch):
    base, digest, _ = server
    first = hub.download_url(f"{base}/w.safetensors", sha256=digest)
    monkeypatch.setenv("VISION_MOE_OFFLINE", "1")
    assert hub.download_url("http://127.0.0.1:9/w.safetensors", sha256=digest) == first  # no network touched
    with pytest.raises(FileNotFoundError, match="offline mode: .*other.safetensors is not cached"):
        hub.download_url("http://127.0.0.1:9/other.safetensors")


def test_unreachable_server_is_a_clear_error(server, monkeypatch):
    with pytest.raises(ConnectionError, match="cannot download http://127.0.0.1:9/x.bin"):
        hub.download_url("http://127.0.0.1:9/x.bin")


def test_registry_and_resolution():
    assert hub.resolve_weights("vit_small_patch16_224.augreg_in21k_ft_in1k").hf_hub_id.startswith("timm/")
    with pytest.raises(ValueError, match="unknown weights 'm3vit_tiny_patch16_224.nothing'"):
        hub.resolve_weights("m3vit_tiny_patch16_224.nothing")
    with pytest.raises(ValueError, match="64 lowercase hex"):
        hub.WeightsEntry(url="http://x/y", sha256="abc")
    with pytest.raises(ValueError, match="exactly one of"):
        hub.WeightsEntry()


def test_download_tool(server, capsys):
    import runpy
    import sys

    base, digest, _ = server
    argv = sys.argv
    sys.argv = ["download.py", "--url", f"{base}/w.safetensors", "--sha256", digest]
    try:
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(ROOT / "tools" / "download.py"), run_name="__main__")
    finally:
        sys.argv = argv
    assert e.value.code == 0
    assert capsys.readouterr().out.strip().endswith("w.safetensors")
