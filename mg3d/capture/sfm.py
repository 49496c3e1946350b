"""Structure-from-motion with pycolmap: features, matching, mapping, undistortion to pinhole.

Sequential matching suits videos (neighbouring frames overlap); exhaustive matching suits unordered
photos up to a few hundred. The incremental mapper is the default; the global mapper (GLOMAP) is an
option. The largest model is kept; too few registered frames is an error that says what to try.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mg3d.errors import SfMError
from mg3d.ui import progress

EXHAUSTIVE_MAX_IMAGES = 300
COLMAP_CAMERA_MODELS = ("SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV")
_PINHOLE_MODELS = ("SIMPLE_PINHOLE", "PINHOLE")


@dataclass
class SfMResult:
    """The kept reconstruction, with the folder of (undistorted) images it refers to."""

    reconstruction: Any  # pycolmap.Reconstruction, pinhole cameras
    image_dir: Path
    model_dir: Path
    matcher: str
    num_images: int
    num_registered: int
    mean_reprojection_error: float
    timings: dict[str, float] = field(default_factory=dict)


def run_sfm(
    image_dir: Path,
    work_dir: Path,
    *,
    ordered: bool,
    single_camera: bool,
    camera_model: str = "SIMPLE_RADIAL",
    matcher: str = "auto",
    mapper: str = "incremental",
    min_registered_fraction: float = 0.5,
    threads: int = -1,
    seed: int = 0,
    verbose: bool = False,
) -> SfMResult:
    """Reconstruct the images in ``image_dir``; scratch files go to ``work_dir``.

    Args:
        ordered: frames are in capture order (a video): ``matcher='auto'`` then matches sequentially.
        single_camera: one shared camera (a video) rather than one per image size/EXIF (photos).
    Raises:
        SfMError: nothing or too few frames registered; the message gives the count and what to try.
    """
    import pycolmap

    pycolmap.logging.minloglevel = 0 if verbose else 2  # keep COLMAP's INFO log off the terminal
    names = sorted(p.name for p in image_dir.iterdir() if p.is_file())
    matcher = ("sequential" if ordered or len(names) > EXHAUSTIVE_MAX_IMAGES else "exhaustive") if matcher == "auto" else matcher
    work_dir.mkdir(parents=True, exist_ok=True)
    database = work_dir / "database.db"
    database.unlink(missing_ok=True)
    timings: dict[str, float] = {}

    with progress() as bar:
        task = bar.add_task("SfM: features", total=None)
        t = time.perf_counter()
        reader = pycolmap.ImageReaderOptions()
        reader.camera_model = camera_model
        extraction = pycolmap.FeatureExtractionOptions()
        extraction.num_threads = threads
        mode = pycolmap.CameraMode.SINGLE if single_camera else pycolmap.CameraMode.AUTO
        pycolmap.extract_features(database, image_dir, image_names=names, camera_mode=mode, reader_options=reader, extraction_options=extraction)
        timings["features_s"] = time.perf_counter() - t

        bar.update(task, description=f"SfM: {matcher} matching")
        t = time.perf_counter()
        matching = pycolmap.FeatureMatchingOptions()
        matching.num_threads = threads
        if matcher == "sequential":
            pairing = pycolmap.SequentialPairingOptions()
            pairing.overlap = 10
            pycolmap.match_sequential(database, matching_options=matching, pairing_options=pairing)
        elif matcher == "exhaustive":
            pycolmap.match_exhaustive(database, matching_options=matching)
        else:
            raise SfMError(f"unknown matcher {matcher!r}", hint="use auto, sequential or exhaustive")
        timings["matching_s"] = time.perf_counter() - t

        bar.update(task, description=f"SfM: {mapper} mapping", total=len(names), completed=0)
        t = time.perf_counter()
        sparse = work_dir / "sparse"
        shutil.rmtree(sparse, ignore_errors=True)
        sparse.mkdir()
        if mapper == "incremental":
            options = pycolmap.IncrementalPipelineOptions()
            options.num_threads = threads
            options.random_seed = seed
            models = pycolmap.incremental_mapping(
                database, image_dir, sparse, options=options, next_image_callback=lambda: bar.advance(task)
            )
        elif mapper == "global":
            models = pycolmap.global_mapping(database, image_dir, sparse)
        else:
            raise SfMError(f"unknown mapper {mapper!r}", hint="use incremental or global")
        timings["mapping_s"] = time.perf_counter() - t

        best_id, best = max(models.items(), key=lambda kv: kv[1].num_reg_images(), default=(None, None))
        registered = best.num_reg_images() if best is not None else 0
        _check_registered(registered, len(names), min_registered_fraction, matcher)
        bar.update(task, completed=registered, description="SfM: undistorting")
        t = time.perf_counter()
        model_dir = sparse / str(best_id)
        model_dir.mkdir(exist_ok=True)
        best.write(model_dir)
        out_images, out_model = image_dir, model_dir
        if any(cam.model.name not in _PINHOLE_MODELS for cam in best.cameras.values()):
            undistorted = work_dir / "undistorted"
            shutil.rmtree(undistorted, ignore_errors=True)
            pycolmap.undistort_images(undistorted, model_dir, image_dir, num_threads=threads)
            out_images, out_model = undistorted / "images", undistorted / "sparse"
            best = pycolmap.Reconstruction(out_model)
        timings["undistort_s"] = time.perf_counter() - t
        bar.update(task, description="SfM: done")

    return SfMResult(
        reconstruction=best,
        image_dir=out_images,
        model_dir=out_model,
        matcher=matcher,
        num_images=len(names),
        num_registered=registered,
        mean_reprojection_error=float(best.compute_mean_reprojection_error()),
        timings={k: round(v, 3) for k, v in timings.items()},
    )


def _check_registered(registered: int, total: int, fraction: float, matcher: str) -> None:
    other = "exhaustive" if matcher == "sequential" else "sequential"
    hint = f"film with more overlap between frames and more texture in view, or try --matcher {other}"
    if registered == 0:
        raise SfMError(f"structure-from-motion registered none of the {total} frames", hint=hint)
    if registered < fraction * total:
        raise SfMError(
            f"structure-from-motion registered only {registered} of {total} frames (needs at least {fraction:.0%})",
            hint=hint,
        )
