"""The player's static files: valid JavaScript (node's own parser), read by the module, and packaged."""
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from visualizer.media import player

ROOT = Path(__file__).resolve().parent.parent


def check_js(body: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """node --check of `body` as gr.HTML runs it: the body of a function of (element, props, ..., watch)."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is needed to check the player's JavaScript (Debian: apt-get install -y nodejs)")
    script = tmp_path / "player-check.js"
    script.write_text(f"(function (element, props, trigger, server, upload, watch) {{\n{body}\n}});\n")
    return subprocess.run([node, "--check", str(script)], capture_output=True, text=True)


def test_player_js_parses(tmp_path):
    result = check_js(player.JS, tmp_path)
    assert result.returncode == 0, result.stderr


def test_the_js_check_catches_a_syntax_error(tmp_path):
    assert check_js(player.JS.replace("const ", "const const ", 1), tmp_path).returncode != 0


def test_the_module_serves_the_files_as_they_are_on_disk():
    for name, text in (("player.html", player.TEMPLATE), ("player.css", player.CSS), ("player.js", player.JS)):
        assert (player.STATIC / name).read_text(encoding="utf-8") == text
    assert 'class="vp-range"' in player.TEMPLATE and ".vp-range" in player.CSS


def test_the_static_files_are_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["visualizer.media"]
    assert {p.name for p in player.STATIC.iterdir()} == {"player.html", "player.css", "player.js"}
    assert all(any(Path("static", f.name).match(p) for p in patterns) for f in player.STATIC.iterdir())


def test_props_of_the_image_player_and_the_playground_share_one_type():
    cell = player.PlayerCell(label="Euler", total=2, steps=[], frames={"xt": [None, None]}, start=True)
    props = player.PlayerProps(cells=[cell], views=[("xt", "x_t")], run="r1").as_props()
    assert props["cells"][0]["start"] is True and props["views"] == [["xt", "x_t"]] and "tabs" not in props
    assert player.PlayerProps(tabs=["numbers"]).as_props()["tabs"] == ["numbers"]
