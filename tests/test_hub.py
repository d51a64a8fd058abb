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
    on_request = None  # a test can record the requests made

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        if _Handler.on_request is not None:
            _Handler.on_request(self.path)
        if self.path.startswith("/truncated"):
            data = (Path(self.directory) / "w.safetensors").read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            return
        super().do_GET()


def _online_cache(monkeypatch, cache) -> None:
    """Weights cache under ``cache``, with neither offline switch set."""
    monkeypatch.setenv("VISION_MOE_CACHE", str(cache))
    monkeypatch.delenv("VISION_MOE_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


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
    _online_cache(monkeypatch, tmp_path / "cache")
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
    with pytest.raises(FileNotFoundError) as e:
        hub.download_url("http://127.0.0.1:9/other.safetensors")
    assert str(e.value) == (
        f"offline (VISION_MOE_OFFLINE=1): http://127.0.0.1:9/other.safetensors is not in the cache as "
        f"{hub.cache_dir() / 'other.safetensors'}; download it once with network access or unset VISION_MOE_OFFLINE"
    )


def test_unreachable_server_is_a_clear_error(server, monkeypatch):
    """Loopback port 9 refuses: one line at once, naming the host, the file and how to work offline."""
    with pytest.raises(ConnectionError) as e:
        hub.download_url("http://127.0.0.1:9/x.bin")
    assert str(e.value) == (
        f"cannot connect to 127.0.0.1:9 (Connection refused) and http://127.0.0.1:9/x.bin is not in the cache "
        f"{hub.cache_dir()}; to work offline, run 'python tools/download.py --url http://127.0.0.1:9/x.bin' where "
        "there is network access, copy that cache folder here (VISION_MOE_CACHE names it) and set VISION_MOE_OFFLINE=1"
    )
    assert not list(hub.cache_dir().iterdir())  # no .part file left


def _no_resolver(monkeypatch, calls: list) -> None:
    """No network: the name resolver fails as it does on a machine without DNS. huggingface_hub may only read its
    cache (a network call would retry for half a minute)."""
    import socket

    import huggingface_hub

    def getaddrinfo(host, *args, **kwargs):
        calls.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    real = huggingface_hub.hf_hub_download

    def cache_only(*args, local_files_only=False, **kwargs):
        assert local_files_only, "the network was tried although it is unreachable"
        return real(*args, local_files_only=True, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", cache_only)


def test_no_network_says_so_at_once_and_how_to_work_offline(tmp_path, monkeypatch, capsys):
    import time

    calls = []
    _online_cache(monkeypatch, tmp_path / "cache")
    _no_resolver(monkeypatch, calls)
    name = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    want = (
        "cannot connect to huggingface.co:443 (Name or service not known) and "
        f"timm/{name}/model.safetensors is not in the cache {tmp_path / 'cache' / 'hf'}; to work offline, run "
        f"'python tools/download.py {name}' where there is network access, copy that cache folder here "
        "(VISION_MOE_CACHE names it) and set VISION_MOE_OFFLINE=1"
    )
    t0 = time.perf_counter()
    _assert_fetch_fails(name, ConnectionError, want, capsys)
    assert time.perf_counter() - t0 < 5 and calls == ["huggingface.co", "huggingface.co"]


def test_no_network_still_serves_the_cached_copy(tmp_path, monkeypatch):
    """A file in huggingface_hub's cache layout is returned without touching the network."""
    _online_cache(monkeypatch, tmp_path / "cache")
    name = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    repo = tmp_path / "cache" / "hf" / f"models--timm--{name}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "model.safetensors").write_bytes(b"cached weights")
    _no_resolver(monkeypatch, calls := [])
    path = hub.fetch_weights(name)
    assert path.read_bytes() == b"cached weights" and calls == ["huggingface.co"]


def test_registry_and_resolution():
    assert hub.resolve_weights("vit_small_patch16_224.augreg_in21k_ft_in1k").hf_hub_id.startswith("timm/")
    with pytest.raises(ValueError, match="unknown weights 'm3vit_tiny_patch16_224.nothing'"):
        hub.resolve_weights("m3vit_tiny_patch16_224.nothing")
    with pytest.raises(ValueError, match="sha256 must be 64 hex digits, got 'abc'"):
        hub.WeightsEntry(url="http://x/y", sha256="abc")
    with pytest.raises(ValueError, match="exactly one of"):
        hub.WeightsEntry()


def _download_tool(*args: str) -> int:
    import runpy
    import sys

    argv = sys.argv
    sys.argv = ["download.py", *args]
    try:
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(ROOT / "tools" / "download.py"), run_name="__main__")
    finally:
        sys.argv = argv
    return e.value.code


def test_download_tool(server, capsys):
    base, digest, _ = server
    assert _download_tool("--url", f"{base}/w.safetensors", "--sha256", digest) == 0
    assert capsys.readouterr().out.strip().endswith("w.safetensors")


def test_sha256_in_either_case(server, capsys):
    base, digest, _ = server
    assert hub.WeightsEntry(url="http://x/y", sha256=digest.upper()).sha256 == digest
    assert hub.sha256_file(hub.download_url(f"{base}/w.safetensors", sha256=digest.upper())) == digest
    assert _download_tool("--url", f"{base}/w.safetensors", "--sha256", digest.upper(), "--filename", "u.st") == 0
    assert capsys.readouterr().out.strip() == str(hub.cache_dir() / "u.st")
    assert _download_tool("vit_tiny_patch16_224.augreg_in21k_ft_in1k", "--sha256", digest) == 2  # not ignored
    assert "--sha256 applies to --url downloads only" in capsys.readouterr().err


@pytest.mark.parametrize("filename", ["../x.safetensors", "sub/dir/w.safetensors", "..", "a\\b.safetensors"])
def test_filename_must_be_plain_before_any_download(server, capsys, filename):
    base, _, _ = server
    hits = []
    _Handler.on_request = hits.append
    try:
        assert _download_tool("--url", f"{base}/w.safetensors", "--filename", filename) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"download.py: error: --filename must be a plain file name, got {filename!r}"
        )
        with pytest.raises(ValueError, match=r"^filename must be a plain file name, got "):
            hub.download_url(f"{base}/w.safetensors", filename=filename)
    finally:
        _Handler.on_request = None
    assert hits == [] and not hub.cache_dir().exists()  # nothing requested, nothing written


def test_unusable_cache_dir_names_vision_moe_cache(server, tmp_path, monkeypatch, capsys):
    base, digest, _ = server
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("VISION_MOE_CACHE", str(blocker / "cache"))
    with pytest.raises(OSError) as e:
        hub.download_url(f"{base}/w.safetensors", sha256=digest)
    msg = str(e.value)
    assert msg.startswith(f"VISION_MOE_CACHE={blocker / 'cache'}: cannot create or write the weights cache ")
    assert msg.endswith("; expected a writable directory") and "\n" not in msg
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda *a, **k: pytest.fail("must not be reached"))
    assert _download_tool("vit_tiny_patch16_224.augreg_in21k_ft_in1k") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: VISION_MOE_CACHE={blocker / 'cache'}: cannot create or write the weights cache ")
    assert "\n" not in err


def _assert_fetch_fails(name: str, exc: type[BaseException], want: str, capsys) -> None:
    """fetch_weights raises ``exc`` with exactly ``want``; tools/download.py prints it as its one error line."""
    with pytest.raises(exc) as e:
        hub.fetch_weights(name)
    assert str(e.value) == want
    assert _download_tool(name) == 1
    assert capsys.readouterr().err.strip() == f"error: {want}"


@pytest.mark.parametrize("var, value", [("VISION_MOE_OFFLINE", "1"), ("HF_HUB_OFFLINE", "true")])
def test_offline_hf_weights_not_cached_is_one_line(tmp_path, monkeypatch, capsys, var, value):
    cache = tmp_path / "cache"
    _online_cache(monkeypatch, cache)
    monkeypatch.setenv(var, value)
    name = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"  # timm's config names the hf repo; nothing is cached
    want = (
        f"offline ({var}={value}): timm/{name}/model.safetensors is not in the cache {cache / 'hf'}; "
        f"download it once with network access (python tools/download.py {name}) or unset {var}"
    )
    _assert_fetch_fails(name, FileNotFoundError, want, capsys)


def test_hf_download_failure_names_the_url(tmp_path, monkeypatch, capsys):
    from huggingface_hub.errors import LocalEntryNotFoundError

    class ConnectError(OSError):  # stands for the HTTP client's connection error
        pass

    _online_cache(monkeypatch, tmp_path / "cache")
    name = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    url = f"https://huggingface.co/timm/{name}/resolve/main/model.safetensors"

    def no_network(*args, **kwargs):  # what huggingface_hub raises after its retries when the host is unreachable
        try:
            raise ConnectError("[Errno -2] Name or service not known")
        except ConnectError as cause:
            raise LocalEntryNotFoundError("An error happened ... check your connection and try again.") from cause

    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_network)
    monkeypatch.setattr(hub, "_check_reachable", lambda *a, **k: None)  # reachable, then the download fails
    want = (
        f"cannot download {url} (ConnectError: [Errno -2] Name or service not known) "
        f"and it is not in the cache {tmp_path / 'cache' / 'hf'}"
    )
    _assert_fetch_fails(name, ConnectionError, want, capsys)

    def not_found(*args, **kwargs):
        raise RuntimeError("404 Client Error.\n\nEntry Not Found for url: ...")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", not_found)
    with pytest.raises(OSError, match=f"^cannot fetch {url} into the cache .*: RuntimeError: 404 Client Error. Entry"):
        hub.fetch_weights(name)
