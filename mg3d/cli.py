"""The ``mg3d`` command: a thin click layer over the stages.

Library code raises :class:`mg3d.errors.Mg3dError`; here it becomes one ``error: ...`` line and a
non-zero exit code (a traceback only with ``--debug``). Stage modules are imported inside the commands,
so ``mg3d --help`` stays fast and never imports torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from mg3d import __version__
from mg3d.errors import InputError, Mg3dError


class _Group(click.Group):
    """Turns mg3d's errors and Ctrl-C into one-line messages and exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Mg3dError as exc:
            if (ctx.obj or {}).get("debug"):
                raise
            _error(str(exc))
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            _error("interrupted; finished stages are kept, the interrupted one will be redone")
            ctx.exit(130)


def _error(message: str) -> None:
    from rich.markup import escape

    from mg3d.ui import console

    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)


def _overrides(ctx: click.Context, names: list[str]) -> dict[str, Any]:
    """Options the user typed on the command line (defaults do not override a preset or --config)."""
    return {n: ctx.params[n] for n in names if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE}


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="mg3d")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """mg3d: a phone video and a text instruction in, an edited 3D model that runs on phones and in browsers out.

    \b
    Start with the built-in demo scene:
      mg3d capture --demo --out demo-ws
      mg3d info demo-ws
    """
    ctx.obj = {"debug": debug}


_CAPTURE_OPTIONS = ["frames", "max_frames", "max_size", "matcher", "mapper", "camera_model", "holdout_every", "min_registered_fraction", "threads", "seed"]


@main.command()
@click.argument("source", required=False, type=click.Path(path_type=Path))
@click.option("--out", "-o", "out", required=True, type=click.Path(path_type=Path), help="Workspace folder to write (created if needed).")
@click.option("--demo", is_flag=True, help="Use the built-in demo video instead of SOURCE.")
@click.option("--frames", type=click.IntRange(min=1), help="Pick exactly this many frames (an error if the input has fewer).")
@click.option("--max-frames", type=click.IntRange(min=5), help="Without --frames, pick up to this many [default: 100].")
@click.option("--max-size", type=click.IntRange(min=32), help="Long side of the frames in pixels [default: 512].")
@click.option("--matcher", type=click.Choice(["auto", "sequential", "exhaustive"]), help="Feature matching [default: auto: sequential for video, exhaustive for photos].")
@click.option("--mapper", type=click.Choice(["incremental", "global"]), help="SfM mapper [default: incremental].")
@click.option("--camera-model", type=click.Choice(["SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV"]), help="Camera model SfM solves for, undistorted to pinhole afterwards [default: SIMPLE_RADIAL].")
@click.option("--holdout-every", type=click.IntRange(min=0), help="Hold out every k-th frame for evaluation; 0: none [default: 8].")
@click.option("--min-registered-fraction", type=click.FloatRange(0, 1, min_open=True), help="Fail when fewer frames register [default: 0.5].")
@click.option("--threads", type=int, help="CPU threads for SfM; -1: all [default: -1].")
@click.option("--seed", type=int, help="Random seed of the mapper [default: 0].")
@click.option("--preset", type=click.Choice(["tiny", "default", "quality"]), help="Preset of option values (configs/<name>.yaml).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="YAML/JSON file with a 'capture:' section; command-line options win.")
@click.option("--force", is_flag=True, help="Redo the stage even if it is up to date.")
@click.option("--verbose", "-v", is_flag=True, help="Show COLMAP's log.")
@click.pass_context
def capture(ctx: click.Context, source: Path | None, out: Path, demo: bool, preset: str | None, config_file: Path | None, force: bool, verbose: bool, **_: Any) -> None:
    """Frames and camera poses from a video, a folder of photos, or a posed dataset.

    SOURCE is a video file, a folder of photos (structure-from-motion with COLMAP recovers the poses),
    or a dataset that already has poses (nerfstudio transforms.json, Blender, LLFF, COLMAP), which is
    imported as it is. The result goes to OUT/capture/ as nerfstudio transforms.json + images.
    """
    from mg3d.capture import CaptureConfig, run
    from mg3d.config import resolve_config
    from mg3d.workspace import Workspace

    if demo == (source is not None):
        raise InputError("give either SOURCE or --demo", hint="e.g. mg3d capture video.mp4 --out ws, or mg3d capture --demo --out ws")
    if demo:
        from mg3d.demo import video_path

        source = video_path()
    config = resolve_config(CaptureConfig, "capture", preset, config_file, _overrides(ctx, _CAPTURE_OPTIONS))
    result = run(source, config, Workspace(out), force=force, verbose=verbose)
    if not result.skipped:
        _print_stage_summary(out, "capture", result.manifest)


_TEACHER_OPTIONS = [
    "steps", "max_time_s", "rays", "target_samples", "lr", "levels", "features", "log2_size", "max_resolution", "hidden",
    "density_bias", "distortion", "grid_resolution", "grid_update_every", "steps_per_ray", "cone", "scene", "bound", "near", "far",
    "appearance", "pose_refine", "random_background", "downscale", "mixed_precision", "checkpoint_every", "eval_views",
    "save_views", "chunk", "device", "seed", "compile",
]


@main.command()
@click.argument("workspace", type=click.Path(path_type=Path))
@click.option("--steps", type=click.IntRange(min=1), help="Training steps (quality preset: 20000) [default: 10000].")
@click.option("--max-time-s", type=click.FloatRange(min=0), help="Stop training after this many seconds; 0: no limit [default: 0].")
@click.option("--rays", type=click.IntRange(min=1), help="Rays in the first batch, then adapted to --target-samples [default: 4096].")
@click.option("--target-samples", type=click.IntRange(min=0), help="Samples per batch the ray count adapts to; 0: keep --rays [default: 262144].")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Adam learning rate [default: 0.01].")
@click.option("--levels", type=click.IntRange(min=1), help="Levels of the hash grid [default: 16].")
@click.option("--features", type=click.IntRange(min=1), help="Features per hash-grid level [default: 2].")
@click.option("--log2-size", type=click.IntRange(min=1), help="log2 of the hash table size per level [default: 19].")
@click.option("--max-resolution", type=click.IntRange(min=1), help="Resolution of the finest hash-grid level [default: 2048].")
@click.option("--hidden", type=click.IntRange(min=1), help="Width of the MLPs [default: 64].")
@click.option("--density-bias", type=float, help="Log density of the untrained field; lower starts more transparent [default: -1.0].")
@click.option("--distortion", type=click.FloatRange(min=0), help="Weight of mip-NeRF 360's distortion loss, which pulls each ray's weight onto one surface (against fog and floaters) [default: 0].")
@click.option("--grid-resolution", type=click.IntRange(min=1), help="Cells per side of the occupancy grid [default: 128].")
@click.option("--grid-update-every", type=click.IntRange(min=1), help="Update the occupancy grid every this many steps [default: 16].")
@click.option("--steps-per-ray", type=click.IntRange(min=1), help="Smallest step is 2 sqrt(3) bound / this [default: 1024].")
@click.option("--cone", type=click.FloatRange(min=0), help="Step growth with distance, unbounded scenes [default: 1/256].")
@click.option("--scene", type=click.Choice(["auto", "bounded", "unbounded"]), help="Scene kind; auto: bounded for RGBA data, else unbounded [default: auto].")
@click.option("--bound", type=click.FloatRange(min=0, min_open=True), help="Half side of the scene cube, bounded scenes [default: 1.5].")
@click.option("--near", type=click.FloatRange(min=0), help="Near distance, unbounded scenes (bounded ones use the scene's) [default: 0.05].")
@click.option("--far", type=click.FloatRange(min=0, min_open=True), help="Far distance, unbounded scenes [default: 1000].")
@click.option("--appearance", type=click.IntRange(min=-1), help="Per-image appearance embedding size; -1: 16 for captures, 0 for RGBA data [default: -1].")
@click.option("--pose-refine/--no-pose-refine", default=None, help="Learn corrections to the training cameras' poses [default: off].")
@click.option("--random-background/--no-random-background", default=None, help="RGBA data: composite on random colours while training [default: on].")
@click.option("--downscale", type=click.IntRange(min=1), help="Shrink the images by this factor for training and evaluation [default: 1].")
@click.option("--mixed-precision/--no-mixed-precision", default=None, help="bf16 autocast on CUDA [default: on].")
@click.option("--checkpoint-every", type=click.IntRange(min=1), help="Save a checkpoint to resume from every this many steps [default: 1000].")
@click.option("--eval-views", type=click.IntRange(min=0), help="Held-out views to evaluate; 0: all [default: 0].")
@click.option("--save-views", type=click.IntRange(min=0), help="Side-by-side pictures (truth | render | depth) to write [default: 4].")
@click.option("--chunk", type=click.IntRange(min=1), help="Rays per render chunk; lower it to save memory [default: 1048576, capped by a candidate budget].")
@click.option("--device", type=str, help="Torch device: auto (CUDA when visible, else CPU), cpu, cuda, cuda:1 ... [default: auto].")
@click.option("--seed", type=int, help="Random seed [default: 0].")
@click.option("--compile", type=click.Choice(["auto", "on", "off"]), help="torch.compile the hash encoding; auto: on CUDA [default: auto].")
@click.option("--preset", type=click.Choice(["tiny", "default", "quality"]), help="Preset of option values (configs/<name>.yaml).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="YAML/JSON file with a 'teacher:' section; command-line options win.")
@click.option("--force", is_flag=True, help="Redo the stage even if it is up to date (and drop its checkpoint).")
@click.pass_context
def teacher(ctx: click.Context, workspace: Path, preset: str | None, config_file: Path | None, force: bool, **_: Any) -> None:
    """Train a radiance field (the teacher) on the capture in WORKSPACE and evaluate it on the held-out views.

    Writes WORKSPACE/teacher/: weights, pictures of held-out views (truth | render | depth) and PSNR/SSIM.
    An interrupted run resumes from its last checkpoint when run again with the same options.
    """
    from mg3d.config import resolve_config
    from mg3d.teacher import TeacherConfig, run
    from mg3d.workspace import Workspace

    config = resolve_config(TeacherConfig, "teacher", preset, config_file, _overrides(ctx, _TEACHER_OPTIONS))
    result = run(Workspace(workspace), config, force=force)
    if not result.skipped:
        from mg3d.ui import console

        _print_stage_summary(workspace, "teacher", result.manifest)
        renders = workspace / "teacher" / "renders"
        if renders.is_dir():
            console.print(f"renders: {renders}")


_DISTILL_OPTIONS = ["views", "resolution", "trajectory", "jitter", "shard_size", "dtype", "chunk", "device", "seed", "source"]


@main.command()
@click.argument("workspace", type=click.Path(path_type=Path))
@click.option("--views", type=click.IntRange(min=1), help="Pseudo views to render (MobileR2L and the quality preset: 10000) [default: 2000].")
@click.option("--resolution", type=click.IntRange(min=0), help="Long side of the pseudo views in pixels, rounded to a multiple of 16; 0: the teacher's training size [default: 0].")
@click.option("--trajectory", type=click.Choice(["auto", "orbit", "path"]), help="Camera distribution: orbit (object-centric), path (hand-held / forward-facing), auto: detect [default: auto].")
@click.option("--jitter", type=click.FloatRange(min=0), help="Path cameras: perturbation as a fraction of the training cameras' spacing [default: 0.5].")
@click.option("--shard-size", type=click.IntRange(min=1), help="Views per shard file [default: 500].")
@click.option("--dtype", type=click.Choice(["uint8", "float16"]), help="Storage of the pseudo images [default: uint8].")
@click.option("--chunk", type=click.IntRange(min=1), help="Rays per teacher render chunk; lower it to save memory [default: 1048576, capped by a candidate budget].")
@click.option("--device", type=str, help="Torch device: auto, cpu, cuda, cuda:1 ... [default: auto].")
@click.option("--seed", type=int, help="Random seed of the cameras [default: 0].")
@click.option("--source", type=str, help="Field to render: auto (the active edit, else the teacher), teacher, edit, or an edit's name [default: auto].")
@click.option("--preset", type=click.Choice(["tiny", "default", "quality"]), help="Preset of option values (configs/<name>.yaml).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="YAML/JSON file with a 'distill:' section; command-line options win.")
@click.option("--force", is_flag=True, help="Redo the stage even if it is up to date.")
@click.pass_context
def distill(ctx: click.Context, workspace: Path, preset: str | None, config_file: Path | None, force: bool, **_: Any) -> None:
    """Render pseudo views with the teacher in WORKSPACE for the student to learn from.

    Cameras are drawn like the training cameras (around the centre for object-centric captures, along
    and near the path for hand-held ones). Writes WORKSPACE/distill/: image shards, cameras, a preview.
    An interrupted run keeps its finished shards.
    """
    from mg3d.config import resolve_config
    from mg3d.student.distill import DistillConfig, run
    from mg3d.workspace import Workspace

    config = resolve_config(DistillConfig, "distill", preset, config_file, _overrides(ctx, _DISTILL_OPTIONS))
    result = run(Workspace(workspace), config, force=force)
    if not result.skipped:
        _print_stage_summary(workspace, "distill", result.manifest)


_EDIT_OPTIONS = [
    "prompt", "name", "edit_model", "guidance_scale", "image_guidance_scale", "diffusion_steps", "noise_min", "noise_max", "mode",
    "rounds", "edit_every", "edit_batch", "edit_resolution", "edit_dtype", "offload", "attention_slicing", "downscale", "steps", "max_time_s",
    "lr", "grow_cells", "distortion", "checkpoint_every", "eval_views", "save_views", "chunk", "device", "seed",
]


@main.command()
@click.argument("workspace", type=click.Path(path_type=Path))
@click.option("--prompt", "-p", type=str, help='The instruction, e.g. "Turn her into a Van Gogh painting".')
@click.option("--name", type=str, help="Folder of the result, WORKSPACE/edit/NAME [default: from the prompt].")
@click.option("--edit-model", type=str, help="InstructPix2Pix: a model id (local Hugging Face cache or the hub), a local diffusers folder, or builtin:color (a fixed colour transform, for checks) [default: timbrooks/instruct-pix2pix].")
@click.option("--guidance-scale", type=click.FloatRange(min=0), help="Text guidance: how strongly to follow the prompt [default: 7.5].")
@click.option("--image-guidance-scale", type=click.FloatRange(min=0), help="Image guidance: how closely to keep the photo [default: 1.5].")
@click.option("--diffusion-steps", type=click.IntRange(min=1), help="DDIM steps per edit [default: 20].")
@click.option("--noise-min", type=click.FloatRange(0, 1), help="Lowest noise level an edit starts from, fraction of the diffusion [default: 0.02].")
@click.option("--noise-max", type=click.FloatRange(0, 1), help="Highest noise level [default: 0.98].")
@click.option("--mode", type=click.Choice(["rounds", "idu"]), help="rounds: edit all views between training rounds; idu: IN2N, one view every --edit-every steps [default: rounds].")
@click.option("--rounds", type=click.IntRange(min=1), help="Editing rounds (rounds mode) [default: 3].")
@click.option("--edit-every", type=click.IntRange(min=1), help="Steps between single-view edits (idu mode) [default: 10].")
@click.option("--edit-batch", type=click.IntRange(min=1), help="Views per diffusion batch (rounds mode) [default: 4].")
@click.option("--edit-resolution", type=click.IntRange(min=64), help="Long side the diffusion runs at; lower it to save memory [default: 512].")
@click.option("--edit-dtype", type=click.Choice(["auto", "float16", "bfloat16", "float32"]), help="Editor precision; auto: float16 on CUDA [default: auto].")
@click.option("--offload/--no-offload", default=None, help="Keep the editor in CPU memory, each model on the GPU only while it runs [default: off].")
@click.option("--attention-slicing/--no-attention-slicing", default=None, help="Slice the UNet's attention to save memory [default: off].")
@click.option("--downscale", type=click.IntRange(min=0), help="Shrink the training images by this factor for the edit; 0: as the teacher trained [default: 0].")
@click.option("--steps", type=click.IntRange(min=1), help="Training steps of the field during the edit [default: 3000].")
@click.option("--max-time-s", type=click.FloatRange(min=0), help="Stop training after this many seconds; 0: no limit [default: 0].")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Learning rate of the field [default: 0.01].")
@click.option("--distortion", type=click.FloatRange(min=0), help="Weight of mip-NeRF 360's distortion loss while the field learns the edits (inconsistent edits pull it towards fog) [default: 0.002, as nerfacto under IN2N].")
@click.option("--grow-cells", type=click.IntRange(min=-1), help="Occupancy-grid cells the edit may fill around the teacher's occupied ones (keeps free space free of fog); -1: anywhere, as IN2N [default: 4].")
@click.option("--checkpoint-every", type=click.IntRange(min=1), help="Save a checkpoint to resume from every this many steps [default: 500].")
@click.option("--eval-views", type=click.IntRange(min=0), help="Held-out views rendered before and after; 0: all [default: 8].")
@click.option("--save-views", type=click.IntRange(min=0), help="Side-by-side pictures (original | edited) to write [default: 4].")
@click.option("--chunk", type=click.IntRange(min=1), help="Rays per render chunk; lower it to save memory [default: 65536: the renders share the GPU with the editor].")
@click.option("--device", type=str, help="Torch device: auto, cpu, cuda, cuda:1 ... [default: auto].")
@click.option("--seed", type=int, help="Random seed [default: 0].")
@click.option("--preview", is_flag=True, help="Edit a few training photos in 2D only and write one picture; no 3D, seconds.")
@click.option("--preview-views", type=click.IntRange(min=1), default=4, show_default=True, help="Photos to edit with --preview.")
@click.option("--use", "use", type=str, help="Make a finished edit (its NAME, or 'none' for the unedited teacher) the one later stages read, and stop.")
@click.option("--preset", type=click.Choice(["tiny", "default", "quality"]), help="Preset of option values (configs/<name>.yaml).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="YAML/JSON file with an 'edit:' section; command-line options win.")
@click.option("--force", is_flag=True, help="Redo this edit even if it is up to date (and drop its checkpoint).")
@click.pass_context
def edit(ctx: click.Context, workspace: Path, preview: bool, preview_views: int, use: str | None, preset: str | None, config_file: Path | None,
         force: bool, **_: Any) -> None:
    """Edit the scene in WORKSPACE by a text instruction, consistently in 3D (Instruct-NeRF2NeRF).

    The teacher keeps training while InstructPix2Pix edits its renders, conditioned on the photos.
    Writes WORKSPACE/edit/NAME/ (edited field, edited images, before | after pictures) and makes it the
    edit that distill, student and export use. Each prompt keeps its own folder; --use switches.
    An interrupted edit resumes when run again with the same prompt and options.

    \b
    Try a prompt on a few photos first (seconds):
      mg3d edit WS --prompt "Turn her into a Van Gogh painting" --preview
    """
    from mg3d.config import resolve_config
    from mg3d.edit import EditConfig, preview as make_preview, run
    from mg3d.ui import console
    from mg3d.workspace import Workspace

    ws = Workspace(workspace)
    if use is not None:
        ws.require("teacher", how=f"run mg3d teacher {workspace} first")
        ws.set_active_edit(None if use == "none" else use)
        console.print(f"later stages now read {'the unedited teacher' if use == 'none' else workspace / 'edit' / use}")
        return
    config = resolve_config(EditConfig, "edit", preset, config_file, _overrides(ctx, _EDIT_OPTIONS))
    if preview:
        path = make_preview(ws, config, preview_views)
        console.print(f"preview: {path}")
        return
    result = run(ws, config, force=force)
    if not result.skipped:
        _print_stage_summary(workspace, f"edit/{result.name}", result.manifest)
        console.print(f"before | after: {workspace / 'edit' / result.name / 'renders'}")


@main.command()
@click.argument("workspace", type=click.Path(path_type=Path), required=False)
@click.option("--port", type=click.IntRange(0, 65535), help="Port to serve on [default: 8173, or the next free one].")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; another than 127.0.0.1 exposes the viewer to your network on purpose.")
@click.option("--open", "open_browser", is_flag=True, help="Open the page in the default browser.")
@click.option("--export-static", "static_dir", type=click.Path(path_type=Path), help="Write the site (page, runtime, model) to this new folder instead of serving it.")
@click.option("--no-isolation", is_flag=True, help="Serve without the COOP/COEP headers (WebAssembly then runs on one thread); for checks.")
@click.option("--install-runtime", is_flag=True, help="Fetch onnxruntime-web from its npm package into the cache and stop.")
def view(workspace: Path | None, port: int | None, host: str, open_browser: bool, static_dir: Path | None, no_isolation: bool, install_runtime: bool) -> None:
    """Serve the web export of WORKSPACE as an interactive page (onnxruntime-web, WebGPU or WASM).

    \b
    mg3d export ws --target web && mg3d view ws --open
    mg3d view ws --export-static site/      # the same page as files, for any static host
    """
    from mg3d.ui import console
    from mg3d import viewer

    if install_runtime:
        console.print(f"onnxruntime-web {viewer.ORT_WEB_VERSION}: {viewer.install_runtime()}")
        return
    if workspace is None:
        raise InputError("WORKSPACE is missing", hint="mg3d view WS (after mg3d export WS --target web)")
    from mg3d.workspace import Workspace

    ws = Workspace(workspace)
    if static_dir is not None:
        out = viewer.export_static(ws, static_dir)
        console.print(f"static site: {out} (serve it with the COOP/COEP headers in _headers for multi-threaded WebAssembly)")
        return
    server = viewer.serve(ws, host=host, port=port, isolate=not no_isolation)
    console.print(f"mg3d viewer on [bold]{server.url}[/] (Ctrl-C to stop)")
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]note:[/] bound to {host}: other machines on your network can open it")
    if open_browser:
        import webbrowser

        webbrowser.open(server.url)
    try:
        server.thread.join()
    except KeyboardInterrupt:
        server.shutdown()
        console.print("viewer stopped")


@main.command()
@click.argument("source", required=False, type=click.Path(path_type=Path))
@click.option("--prompt", "-p", type=str, default="", help='The edit instruction, e.g. "Turn her into a Van Gogh painting".')
@click.option("--out", "-o", "out", type=click.Path(path_type=Path), help="Workspace folder [default: demo-ws with --demo].")
@click.option("--demo", is_flag=True, help="Use the built-in demo video (with --preset tiny unless a preset is given).")
@click.option("--preset", type=click.Choice(["tiny", "default", "quality"]), help="Preset of every stage's options [default: default; tiny with --demo].")
@click.option("--targets", default="onnx,android,ios,web", show_default=True, help="Export targets, comma-separated.")
@click.option("--device", "devices", default="", help="Devices to bench besides this machine (measured when connected, else estimated), comma-separated.")
@click.option("--edit-model", type=str, help="InstructPix2Pix weights: model id, local folder, or builtin:color [default: timbrooks/instruct-pix2pix].")
@click.option("--no-edit", is_flag=True, help="Skip the edit: phone-ready models of the scene as captured.")
@click.option("--set", "sets", multiple=True, help="Any stage option, STAGE.OPTION=VALUE (e.g. teacher.max_time_s=300); repeatable.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="YAML/JSON file with a section per stage; --set wins.")
@click.option("--force", is_flag=True, help="Redo every stage even if it is up to date.")
def build(source: Path | None, prompt: str, out: Path | None, demo: bool, preset: str | None, targets: str, devices: str,
          edit_model: str | None, no_edit: bool, sets: tuple[str, ...], config_file: Path | None, force: bool) -> None:
    """Everything in one command: capture, teacher, edit, distill, student, export, bench, report.

    SOURCE is a video, a folder of photos or a posed dataset. Stages that are up to date are skipped, so
    an interrupted build resumes when run again, and a new --prompt redoes only the edit and what
    follows. The report is OUT/report.html (mg3d report OUT writes it again).

    \b
      mg3d build --demo --no-edit --out demo-ws          # the built-in demo, CPU, minutes
      mg3d build video.mp4 --prompt "Turn her into a Van Gogh painting" --out ws
    """
    from mg3d.build import BuildOptions, build as run_build, command_line, parse_sets

    if demo == (source is not None):
        raise InputError("give either SOURCE or --demo", hint="e.g. mg3d build video.mp4 --prompt \"...\" --out ws, or mg3d build --demo --no-edit")
    if demo:
        from mg3d.demo import video_path

        source, out, preset = video_path(), out or Path("demo-ws"), preset or "tiny"
    if out is None:
        raise InputError("--out is missing", hint="name the workspace folder, e.g. --out ws")
    overrides = parse_sets(sets)
    if edit_model:
        overrides.setdefault("edit", {})["edit_model"] = edit_model
    opts = BuildOptions(source=source, out=out, prompt=prompt, edit=not no_edit, preset=preset or "default",
                        targets=tuple(t.strip() for t in targets.split(",") if t.strip()), devices=tuple(d.strip() for d in devices.split(",") if d.strip()),
                        config_file=config_file, overrides=overrides, force=force, command=command_line())
    try:
        run_build(opts)
    except KeyboardInterrupt:
        _error(f"interrupted; the finished stages are kept: run the same command again to resume ({opts.command})")
        sys.exit(130)


@main.command()
@click.argument("workspace", type=click.Path(path_type=Path))
def report(workspace: Path) -> None:
    """Write WORKSPACE/report.html again from what the workspace holds."""
    from mg3d.report import write_report
    from mg3d.ui import console
    from mg3d.workspace import Workspace

    console.print(f"report: {write_report(Workspace(workspace))}")


_STUDENT_OPTIONS = [
    "depth", "width", "samples", "frequencies", "planes", "plane_resolution", "surface", "detail", "detail_resolution", "depth_weight", "occupancy", "march_steps", "march_box", "head_layers", "head_width", "detail_view", "detail_lines", "detail_scales", "detail_product", "detail_points", "detail_spread", "detail_coarse_once", "sr_factor", "upsample", "activation", "norm", "resolution", "steps",
    "max_time_s", "batch", "lr", "plane_lr", "weight_decay", "warmup", "finetune_fraction", "finetune_real", "mixed_precision", "checkpoint_every", "eval_views",
    "save_views", "preload_gb", "device", "seed", "compile",
]


@main.command()
@click.argument("workspace", type=click.Path(path_type=Path))
@click.option("--depth", type=click.IntRange(min=1), help="Residual blocks (MobileR2L: 28) [default: 28].")
@click.option("--width", type=click.IntRange(min=1), help="Channels of the blocks (MobileR2L: 256) [default: 256].")
@click.option("--samples", type=click.IntRange(min=1), help="Points per ray [default: 8].")
@click.option("--frequencies", type=click.IntRange(min=0), help="Positional-encoding frequencies [default: 6].")
@click.option("--planes", type=click.IntRange(min=0), help="Channels of the learned feature planes (xy, xz, yz) read at every ray point; 0: none, the MobileR2L encoding alone [default: 0].")
@click.option("--plane-resolution", type=click.IntRange(min=2), help="Cells per side of each feature plane [default: 128].")
@click.option("--surface", type=click.Choice(["auto", "on", "off"]), help="The per-pixel surface texture (--detail and the options after it): auto turns it on for bounded scenes (RGBA data such as Blender's) whose pseudo views hold the teacher's surface distances, off for unbounded captures; off is MobileR2L's student [default: auto].")
@click.option("--detail", type=click.IntRange(min=0), help="Channels of the per-pixel surface texture: planes read where each output pixel's ray meets the surface the student predicts (trained on the teacher's depth); 0: none, as --surface off [default: 8].")
@click.option("--detail-resolution", type=click.IntRange(min=2), help="Cells per side of each surface-texture plane [default: 512].")
@click.option("--depth-weight", type=click.FloatRange(min=0), help="Weight of the loss between the student's surface depth and the teacher's [default: 0.1].")
@click.option("--occupancy", type=click.IntRange(min=0), help="Surface texture: cells per side of an occupancy grid baked from the teacher; each pixel's ray is marched through it, so the surface depth is right at occlusion edges; 0: none [default: 256].")
@click.option("--march-steps", type=click.IntRange(min=1), help="Steps of that march over the sample range (with --march-box, over the occupied box) [default: 64].")
@click.option("--march-box/--no-march-box", default=None, help="With --occupancy: spread those steps over each ray's chord through the occupied cells' bounding box instead of the whole sample range (finer steps for the same reads) [default: on].")
@click.option("--head-layers", type=click.IntRange(min=-1), help="Hidden 1x1 layers of the per-pixel head before the rgb conv; 0: none, as MobileR2L; -1: 2 with the surface texture, 0 without [default: -1].")
@click.option("--head-width", type=click.IntRange(min=1), help="Channels of the head's hidden layers [default: 64].")
@click.option("--detail-lines/--no-detail-lines", default=None, help="With --detail: multiply each texture plane's features by a learned line's along the axis the plane lacks (TensoRF's vector-matrix form), so points that share a plane cell differ [default: off].")
@click.option("--detail-scales", type=click.IntRange(min=1), help="With --detail: sets of texture planes at --detail-resolution, half of it, a quarter, ... (multi-scale planes, as K-planes) [default: 3].")
@click.option("--detail-product/--no-detail-product", default=None, help="With --detail: multiply the three texture planes' features (K-planes' Hadamard product: features that depend on all three coordinates) instead of concatenating them [default: on].")
@click.option("--detail-points", type=click.IntRange(min=1), help="With --detail: points along each pixel's ray, centred on the surface, where the texture is read (a shell instead of one point; features concatenated) [default: 3].")
@click.option("--detail-spread", type=click.FloatRange(min=0, min_open=True), help="Spacing of those points, in cells of the finest texture planes [default: 2].")
@click.option("--detail-coarse-once/--no-detail-coarse-once", default=None, help="With --detail-points above 1 and --detail-scales above 1: read the coarser scales once, at the surface, instead of at every point (fewer reads) [default: on].")
@click.option("--detail-view", type=click.IntRange(min=0), help="With --detail: frequencies of the viewing direction's encoding read with the surface texture at every pixel (view-dependent colour); 0: none [default: 2].")
@click.option("--sr-factor", type=click.IntRange(min=1), help="Super-resolution factor, a power of two [default: 8].")
@click.option("--upsample", type=click.Choice(["shuffle", "transpose"]), help="Upsampling: shuffle (depth-to-space, NNAPI-friendly) or transpose (MobileR2L) [default: shuffle].")
@click.option("--activation", type=click.Choice(["gelu_tanh", "gelu"]), help="GELU form: gelu_tanh (tanh approximation; every mobile delegate runs it) or gelu (exact; Erf, which NNAPI lacks) [default: gelu_tanh].")
@click.option("--norm", type=click.Choice(["batch", "none"]), help="BatchNorm in the residual blocks (folded into the convolutions at export; keeps a deep student's residual stream in range) or none [default: batch].")
@click.option("--resolution", type=str, help="Output size: a long side (400) or WIDTHxHEIGHT (400x300); empty: the pseudo views' size [default: ''].")
@click.option("--steps", type=click.IntRange(min=1), help="Training steps (quality preset: 20000) [default: 6000].")
@click.option("--max-time-s", type=click.FloatRange(min=0), help="Stop training after this many seconds; 0: no limit [default: 0].")
@click.option("--batch", type=click.IntRange(min=1), help="Images per step (per process under torchrun) [default: 8].")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="AdamW learning rate [default: 0.001].")
@click.option("--plane-lr", type=click.FloatRange(min=0, min_open=True), help="Learning rate of the feature planes [default: 0.01].")
@click.option("--weight-decay", type=click.FloatRange(min=0), help="AdamW weight decay [default: 0].")
@click.option("--warmup", type=click.IntRange(min=0), help="Linear warm-up steps before the cosine decay [default: 500].")
@click.option("--finetune-fraction", type=click.FloatRange(0, 1), help="Last part of training that mixes in the real training images; 0: none [default: 0.1].")
@click.option("--finetune-real", type=click.FloatRange(0, 1), help="Share of each batch that is real images in that part [default: 0.5].")
@click.option("--mixed-precision/--no-mixed-precision", default=None, help="bf16 autocast and channels-last on CUDA [default: on].")
@click.option("--checkpoint-every", type=click.IntRange(min=1), help="Save a checkpoint to resume from every this many steps [default: 1000].")
@click.option("--eval-views", type=click.IntRange(min=0), help="Held-out views to evaluate; 0: all [default: 0].")
@click.option("--save-views", type=click.IntRange(min=0), help="Side-by-side pictures (truth | teacher | student) to write [default: 4].")
@click.option("--preload-gb", type=click.FloatRange(min=0), help="Keep the pseudo views on the training device when smaller than this [default: 8].")
@click.option("--compile", type=click.Choice(["auto", "on", "off"]), help="torch.compile the network for training; auto: on CUDA. About 5% faster on an H100 after ~40 s of compiling [default: off].")
@click.option("--device", type=str, help="Torch device: auto, cpu, cuda, cuda:1 ... [default: auto].")
@click.option("--seed", type=int, help="Random seed [default: 0].")
@click.option("--for-device", type=str, help="Use the depth, width, super-resolution and resolution that mg3d bench --sweep chose for this device.")
@click.option("--preset", type=click.Choice(["tiny", "default", "quality"]), help="Preset of option values (configs/<name>.yaml).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="YAML/JSON file with a 'student:' section; command-line options win.")
@click.option("--force", is_flag=True, help="Redo the stage even if it is up to date (and drop its checkpoint).")
@click.pass_context
def student(ctx: click.Context, workspace: Path, preset: str | None, config_file: Path | None, force: bool, for_device: str | None, **_: Any) -> None:
    """Train the mobile student (a neural light field) on the pseudo views in WORKSPACE.

    Writes WORKSPACE/student/: weights, pictures of held-out views (truth | teacher | student) and
    PSNR/SSIM against the truth and the teacher. Resumes from its last checkpoint when run again.
    Several GPUs: torchrun --nproc_per_node N -m mg3d student WORKSPACE.
    """
    from mg3d.config import resolve_config
    from mg3d.student import StudentConfig, run
    from mg3d.workspace import Workspace

    overrides = _overrides(ctx, _STUDENT_OPTIONS)
    if for_device:  # the sweep's choice; options typed on the command line still win
        from mg3d.bench.sweep import read_choice

        choice = read_choice(workspace, for_device)
        overrides = {**{k: choice[k] for k in ("depth", "width", "sr_factor", "resolution")}, **overrides}
    config = resolve_config(StudentConfig, "student", preset, config_file, overrides)
    result = run(Workspace(workspace), config, force=force)
    if not result.skipped and result.manifest:
        _print_stage_summary(workspace, "student", result.manifest)


_EXPORT_OPTIONS = ["target", "precision", "palettize", "opset", "tolerance", "verify_poses", "calib_views", "eval_views", "max_int8_loss_db", "seed"]


@main.command("export")
@click.argument("workspace", type=click.Path(path_type=Path))
@click.option("--target", type=str, help="onnx, android (.ort + NNAPI/XNNPACK report), ios (Core ML .mlpackage) or web [default: onnx].")
@click.option("--precision", type=str, help="Comma-separated fp32,fp16,int8 [default: onnx fp32,fp16,int8; android fp32,int8; ios fp16; web fp32,fp16].")
@click.option("--palettize", type=int, help="ios: also write a palettized variant with 4, 6 or 8-bit look-up tables [default: off].")
@click.option("--opset", type=click.IntRange(min=17), help="ONNX opset [default: 17].")
@click.option("--tolerance", type=click.FloatRange(min=0, min_open=True), help="Largest |ONNX fp32 - torch| allowed [default: 1e-4].")
@click.option("--verify-poses", type=click.IntRange(min=1), help="Random poses the fp32 model is checked on [default: 8].")
@click.option("--calib-views", type=click.IntRange(min=1), help="Pseudo-data poses that calibrate int8 [default: 32].")
@click.option("--eval-views", type=click.IntRange(min=0), help="Held-out views for each variant's PSNR; 0: all [default: 0].")
@click.option("--max-int8-loss-db", type=click.FloatRange(min=0), help="PSNR the int8 model may lose [default: 0.5].")
@click.option("--seed", type=int, help="Random seed of the poses [default: 0].")
@click.option("--preset", type=click.Choice(["tiny", "default", "quality"]), help="Preset of option values (configs/<name>.yaml).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="YAML/JSON file with an 'export:' section; command-line options win.")
@click.option("--force", is_flag=True, help="Redo the export even if it is up to date.")
@click.pass_context
def export_(ctx: click.Context, workspace: Path, preset: str | None, config_file: Path | None, force: bool, **_: Any) -> None:
    """Export the student in WORKSPACE for phones and the web: one model that takes a camera pose and returns
    the image, checked against the torch student, in fp32/fp16/int8.

    Writes WORKSPACE/export/<target>/ with the model files, model.json (interface, intrinsics, pose
    convention, size and PSNR of each variant, delegate coverage) and manifest.json.
    """
    from mg3d.config import resolve_config
    from mg3d.export import ExportConfig, run
    from mg3d.workspace import Workspace

    config = resolve_config(ExportConfig, "export", preset, config_file, _overrides(ctx, _EXPORT_OPTIONS))
    result = run(Workspace(workspace), config, force=force)
    if not result.skipped:
        from mg3d.ui import console

        console.print(f"[green]export for {config.target} done[/] in {result.manifest['metrics'].get('duration_s', 0):.1f} s -> {workspace / 'export' / config.target}")
        console.print(_size_table(result.manifest, only=config.target))


def _size_table(manifest: dict[str, Any], only: str | None = None) -> Any:
    from rich.table import Table

    from mg3d.export import size_rows

    table = Table(title="exported models", header_style="bold")
    for col in ("target", "file", "precision", "MB", "PSNR vs fp32", "PSNR loss (dB)"):
        table.add_column(col, justify="right" if col not in ("target", "file", "precision") else "left")
    for row in size_rows(manifest):
        if only and row["target"] != only:
            continue
        table.add_row(row["target"], row["file"], row["precision"], f"{row['mb']:.2f}", _fmt(row["psnr_vs_fp32"]) if row["psnr_vs_fp32"] is not None else "-",
                      _fmt(row["psnr_loss_db"]) if row["psnr_loss_db"] is not None else "-")
    return table


@main.command()
@click.option("--setup", "setup", type=str, help="Install what a device needs here (arm64-emulated: the aarch64 Python and onnxruntime for qemu; browser: onnxruntime-web) and stop.")
def devices(setup: str | None) -> None:
    """Device profiles (devices/*.yaml) and whether each can be measured now."""
    from rich.table import Table

    from mg3d.bench.profiles import load_profiles, reachable, resolve
    from mg3d.ui import console

    if setup:
        profile = resolve(setup)
        if profile.transport == "qemu":
            from mg3d.bench.arm64 import setup as make_sysroot

            console.print(f"{profile.name}: {make_sysroot()}")
        elif profile.transport == "browser":
            from mg3d.viewer import install_runtime

            console.print(f"{profile.name}: onnxruntime-web in {install_runtime()}")
        else:
            raise InputError(f"{profile.name} needs nothing installed here", hint=reachable(profile)[1])
        return

    table = Table(title="devices", header_style="bold")
    for col in ("name", "aliases", "transport", "runtime / provider", "threads", "target FPS", "reachable"):
        table.add_column(col)
    notes = []
    for p in load_profiles().values():
        ok, why = reachable(p)
        table.add_row(p.name, ", ".join(p.aliases), p.transport, f"{p.runtime} / {p.provider}", str(p.threads), f"{p.target_fps:g}", "[green]yes[/]" if ok else "[yellow]no[/]")
        notes.append(f"{p.name}: {why}")
    out = console.__class__(highlight=False)
    out.print(table)
    for line in notes:
        out.print(line, soft_wrap=True)


@main.command()
@click.argument("workspace", type=click.Path(path_type=Path))
@click.option("--device", default="host", show_default=True, help="Device name(s) or aliases, comma-separated (mg3d devices lists them).")
@click.option("--precision", default="", help="fp32, fp16, int8 or all [default: the device profile's].")
@click.option("--estimate", is_flag=True, help="Roofline estimates from the profile's peak rates instead of measurements (devices not connected).")
@click.option("--runs", type=click.IntRange(min=1), default=20, show_default=True, help="Timed runs after warm-up.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Untimed runs first.")
@click.option("--views", type=click.IntRange(min=1), default=4, show_default=True, help="Held-out poses for the on-device PSNR against torch.")
@click.option("--sweep", is_flag=True, help="Pick depth, width and resolution for the device: latency over a grid, then train the largest that reach its target FPS.")
@click.option("--sweep-depths", default="4,8,16,28", show_default=True, help="Depths (residual blocks) of the grid.")
@click.option("--sweep-widths", default="64,128,256", show_default=True, help="Widths of the grid.")
@click.option("--sweep-sizes", default="256,400", show_default=True, help="Output long sides (px) of the grid.")
@click.option("--sweep-sr-factor", type=click.IntRange(min=1), default=8, show_default=True, help="Super-resolution factor of the candidates.")
@click.option("--sweep-top", type=click.IntRange(min=1), default=2, show_default=True, help="How many candidates to train.")
@click.option("--sweep-budget-s", type=click.FloatRange(min=0, min_open=True), default=600.0, show_default=True, help="Training time shared by them, seconds.")
@click.option("--sweep-eval-views", type=click.IntRange(min=0), default=16, show_default=True, help="Held-out views each candidate is evaluated on (0: all).")
def bench(workspace: Path, device: str, precision: str, estimate: bool, runs: int, warmup: int, views: int, **sweep_options: Any) -> None:
    """Latency and on-device quality of the exported student on each DEVICE, or (--sweep) the student
    configuration that device should get.

    Writes WORKSPACE/bench/: <device>.json, report.json and report.html (table and latency-vs-PSNR plot);
    a sweep adds choice-<device>.json, which mg3d student WORKSPACE --for-device DEVICE trains.
    """
    from mg3d.bench import BenchConfig, run
    from mg3d.bench.report import sweep_table, table
    from mg3d.ui import console
    from mg3d.workspace import Workspace

    report = run(Workspace(workspace), BenchConfig(device=device, precision=precision, estimate=estimate, runs=runs, warmup=warmup, views=views, **sweep_options))
    out = console.__class__(highlight=False)
    if any(r.get("rows") for r in report["devices"].values()):
        out.print(table(report))
    for name, result in report["devices"].items():
        if "sweep" in result:
            out.print(sweep_table(name, result["sweep"]))
            if any(r["estimate"] for r in result["sweep"]["rows"]):
                out.print("* estimated from the profile's peak rates, not measured")
        if result.get("error"):
            console.print(f"[yellow]{name} did not run[/]: {result['error']}", soft_wrap=True)
    console.print(f"report: {workspace / 'bench' / 'report.html'}")


def _print_stage_summary(out: Path, stage: str, manifest: dict[str, Any]) -> None:
    from mg3d.ui import console

    metrics = manifest.get("metrics", {})
    console.print(f"[green]{stage} done[/] in {metrics.get('duration_s', 0):.1f} s -> {out / stage}")
    console.print(_metrics_table(stage, metrics))
    if "overview" in manifest.get("outputs", {}):
        console.print(f"overview picture: {out / stage / manifest['outputs']['overview']}")


def _metrics_table(stage: str, metrics: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"{stage} metrics", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, _fmt(value))
    return table


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return " x ".join(map(str, value)) if all(isinstance(v, int) for v in value) else json.dumps(value)
    return str(value)


def _headline(stage: str, m: dict[str, Any]) -> str:
    """The few figures of a stage that the overview table shows; the rest are in the per-stage tables."""
    parts = []
    if "frames_registered" in m:
        parts.append(f"{m['frames_registered']}/{m.get('frames_selected', '?')} frames")
    if "mean_reprojection_error_px" in m:
        parts.append(f"{m['mean_reprojection_error_px']:.2f} px reproj.")
    if "imported_format" in m:
        parts.append(f"from {m['imported_format']}")
    if stage in ("teacher", "student") and "steps" in m:
        parts.append(f"{m['steps']} steps")
    if stage == "distill" and "views" in m:
        parts.append(f"{m['views']} views of {_fmt(m.get('resolution'))} ({m.get('kind')})")
    if stage == "student" and "size_mb_fp16" in m:
        parts.append(f"{m['depth']}x{m['width']}, {m['size_mb_fp16']} MB fp16")
    for key in ("psnr", "ssim"):
        if key in m:
            parts.append(f"{key.upper()} {_fmt(m[key])}")
    if stage == "bench" and "devices" in m:
        parts.append(", ".join(f"{d}: " + (f"sweep chose {v['choice']}, " if v.get("choice") else "") + (f"{v['best_fps']} FPS{' (est.)' if v.get('estimate') else ''}" if v.get("best_fps") else "did not run")
                               for d, v in m["devices"].items()))
    if stage == "export" and "targets" in m:
        parts.append(", ".join(f"{t}: {len(v.get('variants', []))} models" for t, v in m["targets"].items()))
    if stage.startswith("edit/") and "edits" in m:
        parts.append(f"{m['edits']} edits ({m.get('mode')}, {m.get('editor')}), 3D vs edits {_fmt(m.get('train_view_psnr_vs_edits'))} dB")
        if "held_out_psnr_vs_transform" in m:
            parts.append(f"held-out vs expected {_fmt(m['held_out_psnr_vs_transform'])} dB")
    if "psnr_gap_to_teacher" in m:
        parts.append(f"{_fmt(m['psnr_gap_to_teacher'])} dB below the teacher")
    return ", ".join(parts)


@main.command()
@click.argument("workspace", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifests as JSON on stdout.")
def info(workspace: Path, as_json: bool) -> None:
    """Stages of a workspace, their manifests and metrics."""
    from mg3d.errors import WorkspaceError
    from mg3d.workspace import MARKER, Workspace

    ws = Workspace(workspace)
    if not workspace.is_dir():
        raise WorkspaceError(f"workspace {workspace} does not exist", hint="make one with: mg3d capture SOURCE --out " + str(workspace))
    stages, partial = ws.stages(), ws.partial_stages()
    if not stages and not partial and not (workspace / MARKER).is_file():
        raise WorkspaceError(f"{workspace} is not an mg3d workspace", hint="make one with: mg3d capture SOURCE --out " + str(workspace))
    manifests = {name: ws.manifest(name) for name in stages}
    if as_json:
        click.echo(json.dumps({"workspace": str(workspace.resolve()), "stages": manifests, "unfinished": partial}, indent=2))
        return

    from rich.table import Table

    from mg3d.ui import console

    out = console.__class__(highlight=False)  # tables go to stdout
    table = Table(title=f"workspace {workspace}", header_style="bold")
    for col in ("stage", "status", "finished (UTC)", "took", "key figures", "size"):
        table.add_column(col, no_wrap=col != "key figures")
    for name, m in manifests.items():
        metrics = m.get("metrics", {})
        files = m.get("files", {})
        table.add_row(
            name, "[green]done[/]", m.get("finished", "")[:16].replace("T", " "), f"{metrics.get('duration_s', 0):.0f} s",
            _headline(name, metrics), f"{files.get('bytes', 0) / 1e6:.1f} MB",
        )
    for name in partial:
        table.add_row(name, "[yellow]unfinished[/]", "", "", "will be redone", "")
    out.print(table)
    for name, m in manifests.items():
        out.print(_size_table(m) if name == "export" else _metrics_table(name, m.get("metrics", {})))
    if not manifests:
        out.print("no finished stages yet")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
