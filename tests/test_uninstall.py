"""uninstall.py's pure parts, and the one script that lists and removes our files, run here
on a scratch tree: nothing outside our directory is touched, nothing is followed through a link."""

from __future__ import annotations

import subprocess

from backchat import own_paths as own_paths_module, uninstall
from backchat.facts import OWN_PATHS_SCRIPT, OwnPaths
from tests.cfg import make_cfg


def own_paths(mode: str, root, *paths: str) -> dict[str, str]:
    done = subprocess.run(
        ["sh", "-c", OWN_PATHS_SCRIPT, "own-paths", mode, str(root), *paths],
        capture_output=True, text=True, check=True,
    )
    return OwnPaths().process(done.stdout.splitlines())


def tree(tmp_path):
    """Our stack directory, with a link planted at one of our names and one on our path."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "fetch-model").write_text("not ours\n")
    (outside / ".env").write_text("not ours\n")
    root = tmp_path / "backchat"
    (root / "images").mkdir(parents=True)
    (root / "docker-compose.yaml").write_text("name: backchat\n")
    (root / "bin").symlink_to(outside)  # bin/fetch-model would be outside/fetch-model
    (root / ".env").symlink_to(outside / ".env")
    (root / "keep").mkdir()
    (root / "keep" / "theirs").write_text("x")
    return root, outside


def test_listing_names_each_path_without_following_links(tmp_path):
    root, _ = tree(tmp_path)
    found = own_paths("list", root, "docker-compose.yaml", ".env", "bin/fetch-model", "missing", "images", "keep", ".")
    assert found == {
        "docker-compose.yaml": "file", ".env": "link", "bin/fetch-model": "unsafe",
        "images": "emptydir", "keep": "dir", ".": "dir",
    }
    assert own_paths_module.removals(found, ["docker-compose.yaml"]) and not own_paths_module.removals(found, [".env", "keep", "."])


def test_removal_takes_our_files_and_empty_dirs_and_nothing_through_a_link(tmp_path):
    root, outside = tree(tmp_path)
    paths = ["docker-compose.yaml", ".env", "bin/fetch-model", "images", "bin", "keep", "."]
    own_paths("remove", root, *paths)
    assert sorted(path.name for path in root.iterdir()) == [".env", "bin", "keep"]
    assert (outside / "fetch-model").read_text() == "not ours\n" and (outside / ".env").read_text() == "not ours\n"
    # Again: only what is left alone is listed, so the operation yields nothing.
    again = own_paths("list", root, *paths)
    assert not own_paths_module.removals(again, paths)


def test_a_root_that_is_a_link_is_left_alone(tmp_path):
    root, outside = tree(tmp_path)
    linked = tmp_path / "linked"
    linked.symlink_to(outside)
    assert own_paths("remove", linked, "fetch-model", ".") == {".": "unsafe"}
    assert (outside / "fetch-model").exists()
    assert own_paths("list", tmp_path / "nowhere", "x", ".") == {}


def test_the_last_empty_directory_goes_with_the_files(tmp_path):
    root = tmp_path / "stack"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "fetch-model").write_text("#!/bin/sh\n")
    (root / ".env").write_text("KEY=x\n")
    own_paths("remove", root, *uninstall.stack_paths(make_cfg()))
    assert not root.exists()


def test_the_paths_are_what_the_deploy_writes():
    cfg = make_cfg()
    stack = uninstall.stack_paths(cfg)
    assert stack[-4:] == ["bin", "images", "tls", "."], "directories last, deepest first"
    assert {"docker-compose.yaml", ".env", ".hf-token-header", "bin/fetch-model", "frontdoor.conf",
            "tls/cert.pem", "tls/key.pem"} <= set(stack)
    assert uninstall.models_paths(cfg) == ["gpt-3.5-turbo.yaml", "."], "the model stays unless asked"
    removing = uninstall.models_paths(make_cfg(remove_model=True))
    assert removing == [
        "gpt-3.5-turbo.yaml", "mistral-7b-openorca.Q4_K_M.gguf", "mistral-7b-openorca.Q4_K_M.gguf.part",
        "mistral-7b-openorca.Q4_K_M.gguf.lock", ".mistral-7b-openorca.Q4_K_M.gguf.verified",
        ".mistral-7b-openorca.Q4_K_M.gguf.verified.tmp", ".",
    ]
    assert uninstall.backstage_paths(config_gone=False) == [
        "app-config.local.yaml.backchat.bak", "backchat-catalog.yaml", "."
    ]
    assert uninstall.backstage_paths(config_gone=True)[0] == "app-config.local.yaml"


def test_the_gateways_files_and_sockets_go_and_its_directory_with_them(tmp_path):
    """A gateway host's tree as the deploy and HAProxy leave it (HAProxy's sockets too)."""
    import socket

    root = tmp_path / "stack"
    gateway_dir = root / "gateway"
    for name in ("tls", "run"):
        (gateway_dir / name).mkdir(parents=True)
    for name in ("docker-compose.yaml", ".env", "haproxy.cfg", "relay.conf", "tls/gateway.pem", "tls/ca.crt"):
        (gateway_dir / name).write_text("x")
    listeners = []
    for name in ("stats.sock", "admin.sock"):
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(gateway_dir / "run" / name))
        listeners.append(listener)
    paths = uninstall.stack_paths(make_cfg())
    assert paths[paths.index("gateway") + 1:] == ["bin", "images", "tls", "."]
    found = own_paths("list", root, *paths)
    assert found["gateway/run/stats.sock"] == "socket" and own_paths_module.removals(found, ["gateway/run/stats.sock"])
    own_paths("remove", root, *paths)
    for listener in listeners:
        listener.close()
    assert not root.exists()
