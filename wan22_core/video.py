"""Save decoded frames as an H.264 MP4, atomically, and read back what was written.

The encoder is the ffmpeg binary bundled with `imageio-ffmpeg`, driven through a pipe of raw RGB
frames. A video is first encoded to a hidden temp file next to its final name and only moved
there once complete and fsynced, so a crash, a full disk or Ctrl+C never leaves a truncated MP4
under the name a user (or ComfyUI) will open.
"""
from __future__ import annotations

import errno
import os
import pathlib
import re
import secrets
import subprocess
import tempfile

import imageio_ffmpeg
import numpy as np
import torch

from . import config

# Official Wan2.2 saves with imageio `quality=8`, which imageio-ffmpeg turns into
# `-crf int((1 - 8/10) * 51)` = 10 for libx264: near-lossless, so we keep that.
DEFAULT_CRF = 10
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left, or the user's quota is used up


def write_mp4(frames, path, fps: float = config.FPS, overwrite: bool = False,
              crf: int = DEFAULT_CRF) -> pathlib.Path:
    """Encode `frames` [F, H, W, 3] (float in [0, 1], or uint8) to H.264/yuv420p MP4 at `path`.

    Float values are clamped to [0, 1]. yuv420p needs an even width and height, so an odd size
    gets one more bottom row / right column copied from its neighbour (the video is then 1 px
    larger than the frames). The parent folder is created if missing. Without `overwrite`, an
    existing file at `path` is never replaced (FileExistsError). Returns the final path.
    """
    _check_frames(frames)
    _check_encoder_args(fps, crf)
    final = pathlib.Path(path)
    _check_target(final, overwrite)
    folder = final.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _folder_error(err, folder) from err

    tmp = _create_partial(final)
    try:
        _encode(frames, tmp, fps, crf)
        _fsync_file(tmp)
        _publish(tmp, final, overwrite)
    except BaseException as err:  # KeyboardInterrupt too: never leave a partial file behind
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, FileExistsError):
            raise _save_error(err, final) from err
        raise
    _fsync_dir(folder)
    return final


def read_mp4_info(path) -> dict:
    """Frame count, size and frame rate of a video, counting frames by decoding them all."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video {str(path)!r} does not exist")
    # Grey output: counting needs every frame decoded but not 3 bytes per pixel piped back.
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="gray", bits_per_pixel=8)
    try:
        meta = next(reader)
        count = sum(1 for _ in reader)
    finally:
        reader.close()
    width, height = meta["size"]
    return dict(frames=count, width=int(width), height=int(height), fps=float(meta["fps"]))


def unique_path(folder, prefix: str, ext: str = ".mp4") -> pathlib.Path:
    """The next free ComfyUI-style name `folder/prefix_00001.mp4`, `..._00002.mp4`, ...

    `prefix` may contain subfolders ("wan22/video"); they are created. The counter is one past
    the highest already used for that prefix, so deleting an old file never reuses its number.
    Two savers racing for the same name are caught by `write_mp4` (FileExistsError), not here.
    """
    if not ext.startswith(".") or "/" in ext or os.sep in ext:
        raise ValueError(f"ext must look like '.mp4', got {ext!r}")
    root = pathlib.Path(folder).resolve()
    rel = pathlib.PurePath(prefix)
    if (not prefix or not rel.name or rel.is_absolute() or ".." in rel.parts
            or prefix.endswith(("/", os.sep))):
        raise ValueError(
            f"prefix {prefix!r} must be a relative name inside the output folder such as "
            "'wan22/video' (no '..', no absolute path, not ending in '/')")
    target_dir = (root / rel).parent
    # Defends against symlinks inside `folder` that point out of it.
    if os.path.commonpath([root, target_dir.resolve()]) != str(root):
        raise ValueError(f"prefix {prefix!r} resolves outside the output folder {str(root)!r}")
    target_dir.mkdir(parents=True, exist_ok=True)

    used = re.compile(re.escape(rel.name) + r"_(\d{5,})(?:[._]|$)")
    counters = [int(m.group(1)) for name in os.listdir(target_dir) if (m := used.match(name))]
    return target_dir / f"{rel.name}_{max(counters, default=0) + 1:05d}{ext}"


# ---- validation ------------------------------------------------------------------------------

def _check_frames(frames) -> None:
    if not isinstance(frames, (torch.Tensor, np.ndarray)):
        raise ValueError(f"frames must be a torch.Tensor or numpy array [F, H, W, 3], "
                         f"got {type(frames).__name__}")
    shape = tuple(frames.shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"frames must have shape [F, H, W, 3] (ComfyUI IMAGE layout, RGB), "
                         f"got {list(shape)}")
    if 0 in shape:
        raise ValueError(f"frames is empty (shape {list(shape)}); need at least one 1x1 frame")
    if _is_uint8(frames):
        return
    is_float = frames.is_floating_point() if isinstance(frames, torch.Tensor) \
        else np.issubdtype(frames.dtype, np.floating)
    if not is_float:
        raise ValueError(f"frames must be float in [0, 1] or uint8, got dtype {frames.dtype}")
    finite = torch.isfinite(frames).all() if isinstance(frames, torch.Tensor) \
        else np.isfinite(frames).all()
    if not finite:
        raise ValueError("frames contain NaN or inf; check the VAE decode (e.g. fp16 overflow) "
                         "before saving")


def _check_encoder_args(fps, crf) -> None:
    if not config.is_finite_real(fps) or fps <= 0:
        raise ValueError(f"fps must be a finite number > 0, got {fps!r} (Wan2.2 uses "
                         f"{config.FPS})")
    if not config.is_integer(crf) or not 0 <= crf <= 51:
        raise ValueError(f"crf must be an integer in [0, 51] (lower is better quality), "
                         f"got {crf!r}")


def _check_target(final: pathlib.Path, overwrite: bool) -> None:
    # Checked before encoding to fail fast; `_publish` re-checks atomically at the end.
    if final.is_dir():
        raise IsADirectoryError(f"output path {str(final)!r} is a folder; give a file name "
                                "such as 'out/video.mp4'")
    if final.exists() and not overwrite:
        raise _exists_error(final)


def _is_uint8(frames) -> bool:
    return frames.dtype in (torch.uint8, np.uint8)


def _exists_error(final: pathlib.Path) -> FileExistsError:
    return FileExistsError(errno.EEXIST, f"{str(final)!r} already exists; pass overwrite=True "
                           "to replace it or choose another name (see unique_path)")


def _save_error(err: OSError, final: pathlib.Path) -> OSError:
    """A failure while writing (e.g. the disk filled up): say that nothing was saved, and what helps."""
    fix = ("the disk is full: free some space or choose an output folder on another disk"
           if err.errno in _DISK_FULL else "choose another output folder or fix this one")
    return OSError(err.errno, f"could not save {str(final)!r}: {err.strerror or err}; nothing was written under "
                   f"that name (the partial file was removed); {fix}")


def _folder_error(err: OSError, folder: pathlib.Path) -> OSError:
    # OSError(errno, ...) builds the matching subclass (PermissionError for EACCES), so callers
    # can still catch the specific type.
    return OSError(err.errno, f"cannot write a video into folder {str(folder)!r}: "
                   f"{err.strerror or err}; choose a writable output folder or fix its "
                   "permissions")


# ---- encoding --------------------------------------------------------------------------------

def _frame_to_uint8(frame) -> np.ndarray:
    """One [H, W, 3] frame -> contiguous uint8 RGB with even H and W (edge row/column added)."""
    if isinstance(frame, torch.Tensor):
        frame = frame.detach().cpu()
        frame = frame.numpy() if frame.dtype == torch.uint8 else frame.float().numpy()
    if frame.dtype != np.uint8:
        frame = np.rint(np.clip(frame.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
    height, width = frame.shape[:2]
    if height % 2 or width % 2:
        frame = np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    return np.ascontiguousarray(frame)


def _ffmpeg_command(width: int, height: int, fps: float, crf: int, out: pathlib.Path) -> list:
    return [
        imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", repr(float(fps)),
        "-i", "pipe:0", "-an",
        "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(crf),
        "-movflags", "+faststart",  # index at the front: browsers can play while downloading
        "-f", "mp4", "-y", str(out),  # -y: `out` is our own empty placeholder
    ]


def _encode(frames, out: pathlib.Path, fps: float, crf: int) -> None:
    """Pipe every frame into ffmpeg; ffmpeg is always reaped, and killed if we stop early."""
    height, width = frames.shape[1] + frames.shape[1] % 2, frames.shape[2] + frames.shape[2] % 2
    # stderr goes to a file, not a pipe: a pipe nobody reads can fill and deadlock ffmpeg.
    with tempfile.TemporaryFile() as log:
        # Own session: Ctrl+C in a terminal reaches only us, and we kill ffmpeg, instead of
        # ffmpeg catching SIGINT and neatly finishing a truncated video.
        proc = subprocess.Popen(_ffmpeg_command(width, height, fps, crf, out),
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log,
                                start_new_session=True)
        try:
            _pipe_frames(frames, proc.stdin)
            returncode = proc.wait()
        finally:
            _reap(proc)
        if returncode != 0:
            log.seek(0)
            detail = log.read().decode(errors="replace").strip()[-2000:]
            for code in _DISK_FULL:  # ffmpeg's own writes failed: an OSError, like our writes would give
                if os.strerror(code) in detail:
                    raise OSError(code, os.strerror(code))
            raise RuntimeError(f"ffmpeg failed (exit code {returncode}) writing {str(out)!r}:\n"
                               f"{detail or '(no output)'}")


def _pipe_frames(frames, stdin) -> None:
    try:
        for frame in frames:
            stdin.write(_frame_to_uint8(frame).data)
        stdin.close()  # EOF: ffmpeg finishes the file and exits
    except BrokenPipeError:
        pass  # ffmpeg exited early; its exit code and log say why


def _reap(proc: subprocess.Popen) -> None:
    """Kill ffmpeg if it still runs (we stopped early), wait for it, close our end of the pipe."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    try:
        proc.stdin.close()
    except BrokenPipeError:
        pass  # frames still buffered for an ffmpeg that is gone


# ---- atomic file handling --------------------------------------------------------------------

def _create_partial(final: pathlib.Path) -> pathlib.Path:
    """Reserve a hidden `.<name>.<random>.partial.mp4` in the target folder (O_EXCL)."""
    for _ in range(100):
        # Name cut to 200 characters: the suffixes must not push it past the 255-byte limit.
        tmp = final.with_name(f".{final.name[:200]}.{secrets.token_hex(4)}.partial.mp4")
        try:
            # Mode 0o666 (minus umask), unlike mkstemp's 0o600, so the published video has the
            # permissions any other new file in that folder would get.
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
        except OSError as err:
            raise _folder_error(err, final.parent) from err
    raise FileExistsError(f"could not pick a free temp name next to {str(final)!r}")


def _publish(tmp: pathlib.Path, final: pathlib.Path, overwrite: bool) -> None:
    """Move the finished temp file to `final`; without `overwrite` never clobber a file."""
    if overwrite:
        os.replace(tmp, final)
        return
    try:
        # link() fails if `final` exists, so a file created by someone else since
        # `_check_target` is never replaced.
        os.link(tmp, final)
    except FileExistsError:
        raise _exists_error(final) from None
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK,
                             errno.ENOSYS):
            raise
        _publish_without_links(tmp, final)
        return
    tmp.unlink()


def _publish_without_links(tmp: pathlib.Path, final: pathlib.Path) -> None:
    """Fallback for filesystems without hard links (FAT, some network/FUSE mounts)."""
    # Claim the name with O_EXCL first, then rename onto our own claim: as race-free as link(),
    # at the cost of an empty file being visible under `final` for the instant in between.
    try:
        os.close(os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except FileExistsError:
        raise _exists_error(final) from None
    try:
        os.replace(tmp, final)
    except BaseException:
        final.unlink(missing_ok=True)
        raise


def _fsync_file(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: pathlib.Path) -> None:
    # Makes the rename itself durable. Best effort: some platforms cannot open a directory.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
