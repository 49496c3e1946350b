"""Viewer: the page in headless Chromium (Debian's chromium driven by Playwright) renders the web export,
pixel for pixel like onnxruntime in Python, moves on a drag, shows its FPS; static export; bad input."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mg3d.cli import main
from tests.conftest import one_line_error

ort = pytest.importorskip("onnxruntime")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def web_ws(trained: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = Path(shutil.copytree(trained[0], tmp_path_factory.mktemp("view") / "ws"))
    result = CliRunner().invoke(main, ["export", str(ws), "--target", "web"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return ws


@pytest.fixture(scope="module")
def browser():  # type: ignore[no-untyped-def]
    playwright = pytest.importorskip("playwright.sync_api")
    from mg3d.viewer import find_runtime

    if chromium() is None:
        pytest.skip("no chromium on this machine (apt-get install chromium; .ci/run installs it)")
    if find_runtime() is None:
        pytest.skip("onnxruntime-web is not installed (mg3d view --install-runtime; .ci/run runs it)")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        yield b
        b.close()


def open_page(browser, url: str):  # type: ignore[no-untyped-def]
    page = browser.new_page(viewport={"width": 900, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_function("window.mg3d !== undefined")
    page.evaluate("window.mg3d.ready")
    assert not errors, errors
    return page


def test_page_renders_like_onnxruntime_moves_and_shows_fps(web_ws: Path, browser) -> None:  # type: ignore[no-untyped-def]
    from mg3d.viewer import serve
    from mg3d.workspace import Workspace

    server = serve(Workspace(web_ws), port=0)
    page = None
    try:
        page = open_page(browser, server.url)
        assert page.locator("#backend").inner_text() == "WebAssembly (SIMD)"  # headless Chromium has no WebGPU adapter
        assert int(page.locator("#threads").inner_text()) >= 1 and page.evaluate("self.crossOriginIsolated")
        # a fixed pose: the browser's pixels against onnxruntime's in Python
        model = json.loads((web_ws / "export" / "web" / "model.json").read_text())
        pose = np.array(model["cameras"]["example_pose"], np.float32)
        out = page.evaluate("async (p) => await window.mg3d.render(p)", pose.reshape(-1).tolist())
        w, h = model["resolution"]
        assert out["dims"] == [1, 3, h, w]
        browser_rgb = np.array(out["pixels"], np.float32).reshape(1, 3, h, w)
        session = ort.InferenceSession(str(web_ws / "export" / "web" / "model.onnx"), providers=["CPUExecutionProvider"])
        python_rgb = session.run(None, {"c2w": pose[None]})[0]
        mse = float(np.mean((browser_rgb - python_rgb) ** 2))
        assert -10 * np.log10(max(mse, 1e-12)) >= 40.0, mse
        # a drag moves the camera and changes the picture
        before_pose = page.evaluate("window.mg3d.pose()")
        before_shot = page.locator("#view").screenshot()
        box = page.locator("#view").bounding_box()
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(cx, cy)
        page.mouse.down()
        page.mouse.move(cx + 120, cy + 30, steps=6)
        page.mouse.up()
        page.wait_for_timeout(1500)
        after_pose = page.evaluate("window.mg3d.pose()")
        assert not np.allclose(before_pose, after_pose)
        assert page.locator("#view").screenshot() != before_shot
        # the FPS read-out is a number once frames are rendered continuously
        page.locator("#continuous").check()
        page.wait_for_function("document.querySelector('#fps').textContent !== '–'", polling=100)
        page.wait_for_timeout(1000)
        fps = float(page.locator("#fps").inner_text())
        latency = float(page.locator("#latency").inner_text())
        assert fps > 0 and latency > 0
        # the fp16 variant loads and renders too
        page.select_option("#variant", "model.fp16.onnx")
        page.wait_for_function("window.mg3d.state.variant && window.mg3d.state.variant.precision === 'fp16'")
        fp16 = page.evaluate("async (p) => await window.mg3d.render(p)", pose.reshape(-1).tolist())
        assert np.abs(np.array(fp16["pixels"]) - python_rgb.reshape(-1)).max() < 0.05
        assert "error" not in (page.locator("#message").get_attribute("class") or "")
        # the resolution switch: the half-size model renders half the width and height
        page.select_option("#variant", "model.half.onnx")
        page.wait_for_function("window.mg3d.state.variant && window.mg3d.state.variant.file === 'model.half.onnx'")
        half = page.evaluate("async (p) => await window.mg3d.render(p)", pose.reshape(-1).tolist())
        assert half["dims"] == [1, 3, h // 2, w // 2] and page.locator("#size").inner_text() == f"{w // 2}x{h // 2} fp32"
        page.select_option("#variant", "model.onnx")
        page.wait_for_function("window.mg3d.state.variant && window.mg3d.state.variant.file === 'model.onnx'")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "viewer.png"))
    finally:
        if page is not None:
            page.close()
        server.shutdown()


def test_without_cross_origin_isolation_it_runs_on_one_thread_and_says_so(web_ws: Path, browser) -> None:  # type: ignore[no-untyped-def]
    from mg3d.viewer import serve
    from mg3d.workspace import Workspace

    server = serve(Workspace(web_ws), port=0, isolate=False)
    page = None
    try:
        page = open_page(browser, server.url)
        assert page.locator("#threads").inner_text() == "1" and not page.evaluate("self.crossOriginIsolated")
        assert "one thread" in page.locator("#message").inner_text()
        page.locator("#continuous").check()
        page.wait_for_function("document.querySelector('#fps').textContent !== '–'", polling=100)
        assert float(page.locator("#fps").inner_text()) > 0
    finally:
        if page is not None:
            page.close()
        server.shutdown()


def test_static_export_is_a_complete_site(web_ws: Path, tmp_path: Path) -> None:
    from mg3d.viewer import ORT_FILES, find_runtime

    if find_runtime() is None:
        pytest.skip("onnxruntime-web is not installed (mg3d view --install-runtime)")
    site = tmp_path / "site"
    result = CliRunner().invoke(main, ["view", str(web_ws), "--export-static", str(site)])
    assert result.exit_code == 0, result.output
    for name in ("index.html", "viewer.js", "scene.json", "_headers", "model/model.onnx", "model/model.fp16.onnx", "model/model.half.onnx", *(f"ort/{f}" for f in ORT_FILES)):
        assert (site / name).is_file(), name
    scene = json.loads((site / "scene.json").read_text())
    assert scene["kind"] in ("orbit", "path") and scene["model"]["resolution"]
    again = CliRunner().invoke(main, ["view", str(web_ws), "--export-static", str(site)])
    one_line_error(again, "not an empty folder")


def test_bad_input(web_ws: Path, trained: tuple[Path, str], tmp_path: Path) -> None:
    one_line_error(CliRunner().invoke(main, ["view", str(trained[0])]), "no web export", "--target web")
    from mg3d.viewer import find_runtime

    if find_runtime() is None:
        pytest.skip("onnxruntime-web is not installed (mg3d view --install-runtime)")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        one_line_error(CliRunner().invoke(main, ["view", str(web_ws), "--port", str(port)]), f"port {port}", "--port")
