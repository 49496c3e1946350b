"""Viewer: the web export rendered live in a browser page with onnxruntime-web.

``mg3d view WS`` serves ``WS/export/web`` with the page in ``static/`` and the onnxruntime-web files
(taken from the npm package once, into ``~/.cache/mg3d/``; nothing is loaded from a CDN), on
127.0.0.1 with the COOP/COEP headers that multi-threaded WebAssembly needs. ``--export-static DIR``
writes the same site as files for any static host.

    server = serve(Workspace("ws"), port=0)          # a running server; server.url, server.shutdown()
    export_static(Workspace("ws"), Path("site"))     # page + runtime + model + scene.json
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from mg3d.errors import Mg3dError
from mg3d.workspace import Workspace

ORT_WEB_VERSION = "1.30.0"
#: The runtime files the page loads: the WebGPU build (WebGPU + WASM) and the smaller WASM-only build.
ORT_FILES = ("ort.webgpu.min.mjs", "ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm",
             "ort-wasm-simd-threaded.jsep.mjs", "ort-wasm-simd-threaded.jsep.wasm", "ort-wasm-simd-threaded.asyncify.mjs",
             "ort-wasm-simd-threaded.asyncify.wasm")
STATIC = Path(__file__).parent / "static"
DEFAULT_PORT = 8173
_TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm", ".onnx": "application/octet-stream",
          ".json": "application/json", ".html": "text/html; charset=utf-8", ".png": "image/png"}


class ViewerError(Mg3dError):
    """The viewer cannot start: no web export, no runtime, or the port is taken."""


# ---- the onnxruntime-web files ----------------------------------------------------------------------
def runtime_dir() -> Path:
    root = Path(os.environ.get("MG3D_CACHE", Path.home() / ".cache" / "mg3d"))
    return root / f"onnxruntime-web-{ORT_WEB_VERSION}"


def find_runtime() -> Path | None:
    folder = runtime_dir()
    return folder if all((folder / f).is_file() for f in ORT_FILES) else None


def install_runtime() -> Path:
    """Take onnxruntime-web's browser files from its npm package into the cache (once; needs npm)."""
    found = find_runtime()
    if found:
        return found
    npm = shutil.which("npm")
    if npm is None:
        raise ViewerError(
            f"onnxruntime-web {ORT_WEB_VERSION} is not installed and npm is not available to fetch it",
            hint=f"install Node.js (npm) and run mg3d view --install-runtime, or copy {', '.join(ORT_FILES[:2])} ... from the package's dist/ into {runtime_dir()}",
        )
    target = runtime_dir()
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([npm, "pack", f"onnxruntime-web@{ORT_WEB_VERSION}", "--silent"], cwd=tmp, capture_output=True, text=True, timeout=600)
        packs = list(Path(tmp).glob("onnxruntime-web-*.tgz"))
        if done.returncode != 0 or not packs:
            raise ViewerError(f"npm could not fetch onnxruntime-web {ORT_WEB_VERSION} ({(done.stderr or done.stdout).strip()[:160]})",
                              hint="check that the npm registry is reachable, then run mg3d view --install-runtime again")
        import tarfile

        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
        with tarfile.open(packs[0]) as tar:
            for name in ORT_FILES:
                member = tar.getmember(f"package/dist/{name}")
                with tar.extractfile(member) as src, open(staging / name, "wb") as dst:  # type: ignore[union-attr]
                    shutil.copyfileobj(src, dst)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # the cache holds a complete runtime or none
    return target


# ---- what the page needs from the workspace ---------------------------------------------------------
def web_export(workspace: Workspace) -> Path:
    folder = workspace.stage_dir("export") / "web"
    if not (folder / "model.json").is_file():
        raise ViewerError(f"workspace {workspace.root} has no web export", hint=f"make it with: mg3d export {workspace.root} --target web")
    return folder


def scene_info(workspace: Workspace) -> dict[str, Any]:
    """The camera rig the page moves within: an orbit around the focus point at the training radii and
    elevations, or the training path with a little freedom around it."""
    from mg3d.formats.nerfstudio import load_nerfstudio
    from mg3d.student.cameras import camera_kind, orbit_frame

    model = json.loads((web_export(workspace) / "model.json").read_text())
    scene = load_nerfstudio(workspace.stage_dir("capture") / "transforms.json")
    c2w = scene.c2w[scene.splits["train"]].astype(np.float64)
    distill = workspace.stage_dir("distill") / "distill.json"
    kind = json.loads(distill.read_text()).get("kind") if distill.is_file() else camera_kind(c2w)
    info: dict[str, Any] = {"kind": kind, "model": model, "start": c2w[0].tolist()}
    if kind == "orbit":
        f = orbit_frame(c2w)
        arc = list(f["arc"]) if f["arc"] else None
        # start in the middle of what the cameras covered, so that a drag can go either way
        start_az = arc[0] + arc[1] / 2 if arc else float(f["azimuth"][0])
        radius, elevation = f["radius"], f["elevation"]
        info.update({"center": f["center"].tolist(), "up": f["up"].tolist(), "e1": f["e1"].tolist(), "e2": f["e2"].tolist(),
                     "radius": [float(radius.min()), float(np.median(radius)), float(radius.max())],
                     "elevation": [float(elevation.min()), float(elevation.max())], "azimuth_arc": arc,
                     "start_azimuth": start_az, "start_elevation": float(np.median(elevation))})
    else:
        step = max(1, len(c2w) // 200)
        path = c2w[::step]
        spacing = float(np.median(np.linalg.norm(np.diff(path[:, :3, 3], axis=0), axis=1))) if len(path) > 1 else 0.05
        info.update({"path": [m.tolist() for m in path], "spacing": spacing})
    return info


def variants(folder: Path) -> list[dict[str, Any]]:
    model = json.loads((folder / "model.json").read_text())
    return [v for v in model.get("variants", []) if (folder / v["file"]).is_file()]


# ---- serving ----------------------------------------------------------------------------------------
class _Handler(SimpleHTTPRequestHandler):
    routes: dict[str, Path] = {}  # URL path -> file (nothing else is served)
    generated: dict[str, bytes] = {}
    isolate = True

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        path = "/index.html" if path == "/" else path
        if path in self.generated:
            body = self.generated[path]
        elif path in self.routes:
            body = self.routes[path].read_bytes()
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", _TYPES.get(Path(path).suffix, "application/octet-stream"))
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        if self.isolate:  # cross-origin isolation: SharedArrayBuffer, so WASM runs on several threads
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        """http.server writes a line per request to stderr; the viewer stays quiet (errors reach the page)."""


def site_files(workspace: Workspace) -> tuple[dict[str, Path], dict[str, bytes]]:
    """URL path -> file, and URL path -> generated bytes, of the whole site."""
    folder = web_export(workspace)
    return model_site(folder, [v["file"] for v in variants(folder)], scene_info(workspace))


def model_site(folder: Path, files: list[str], scene: dict[str, Any]) -> tuple[dict[str, Path], dict[str, bytes]]:
    """The site for model ``files`` in ``folder`` and a ``scene`` (see :func:`scene_info`)."""
    runtime = find_runtime() or install_runtime()
    routes = {f"/{p.name}": p for p in STATIC.iterdir() if p.is_file()}
    routes.update({f"/ort/{name}": runtime / name for name in ORT_FILES})
    routes.update({f"/model/{name}": folder / name for name in files})
    return routes, {"/scene.json": json.dumps(scene).encode()}


class Server:
    """A running viewer: ``url``, and ``shutdown()``."""

    def __init__(self, httpd: ThreadingHTTPServer) -> None:
        self.httpd = httpd
        host, port = httpd.server_address[:2]
        self.url = f"http://{host}:{port}/"
        self.thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        self.thread.start()

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve(workspace: Workspace, host: str = "127.0.0.1", port: int | None = None, isolate: bool = True) -> Server:
    """Start serving ``workspace``'s web export in a background thread.

    ``port`` None tries 8173 and the next 19 ports; 0 lets the system choose; a given port that is taken
    is an error that says so.
    """
    return serve_site(*site_files(workspace), host=host, port=port, isolate=isolate)


def serve_site(routes: dict[str, Path], generated: dict[str, bytes], host: str = "127.0.0.1", port: int | None = None, isolate: bool = True) -> Server:
    handler = type("Handler", (_Handler,), {"routes": routes, "generated": generated, "isolate": isolate})
    candidates = [port] if port is not None else list(range(DEFAULT_PORT, DEFAULT_PORT + 20))
    for p in candidates:
        try:
            return Server(ThreadingHTTPServer((host, p), handler))
        except OSError as exc:
            last = exc
    if port is not None:
        raise ViewerError(f"port {port} on {host} is in use ({last.strerror})", hint="pick another with --port, or leave --port out to use a free one")
    raise ViewerError(f"ports {candidates[0]}-{candidates[-1]} on {host} are all in use", hint="pick a free one with --port")


def browser_executable() -> str | None:
    """Chromium on this machine (Debian's ``chromium``), for the tests and the browser bench."""
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def export_static(workspace: Workspace, out: Path) -> Path:
    """Write the site (page, runtime, model, scene.json, a _headers file) to ``out``, which must be new or empty."""
    routes, generated = site_files(workspace)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ViewerError(f"{out} exists and is not an empty folder", hint="choose a new folder for --export-static")
    staging = Path(tempfile.mkdtemp(prefix=".mg3d-site-", dir=out.parent if out.parent.exists() else None))
    try:
        for url, src in routes.items():
            dst = staging / url.lstrip("/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        for url, body in generated.items():
            (staging / url.lstrip("/")).write_bytes(body)
        # Netlify / Cloudflare Pages read _headers: the isolation headers that let WASM use threads
        (staging / "_headers").write_text("/*\n  Cross-Origin-Opener-Policy: same-origin\n  Cross-Origin-Embedder-Policy: require-corp\n")
        if out.exists():
            out.rmdir()
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
