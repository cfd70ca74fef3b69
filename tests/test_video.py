"""MP4 output: round trip, odd sizes, no-clobber, atomic failure handling, unique names."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from procs import in_unprivileged_child

from wan22_core import config, video

REPO_ROOT = Path(__file__).resolve().parents[1]


def gradient(frames: int, height: int, width: int) -> torch.Tensor:
    """A smooth moving gradient [F, H, W, 3] in [0, 1]: easy for H.264, so errors stay small."""
    t = torch.linspace(0, 1, frames)[:, None, None]
    y = torch.linspace(0, 1, height)[None, :, None]
    x = torch.linspace(0, 1, width)[None, None, :]
    rgb = [(x + 0.2 * t) % 1.0, y.expand(frames, height, width), 0.5 * (x + y) * (1 - 0.5 * t)]
    return torch.stack([c.expand(frames, height, width) for c in rgb], dim=-1)


def read_rgb(path: Path) -> np.ndarray:
    """Decoded video as float [F, H, W, 3] in [0, 1]."""
    reader = imageio_ffmpeg.read_frames(str(path))
    width, height = next(reader)["size"]
    frames = [np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader]
    return np.stack(frames).astype(np.float32) / 255.0


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name)


# ---- round trip ------------------------------------------------------------------------------

@pytest.mark.parametrize("frames,height,width,fps", [(9, 48, 64, 16), (17, 32, 32, 24)])
def test_round_trip_preserves_count_size_fps_and_pixels(tmp_path, frames, height, width, fps):
    source = gradient(frames, height, width)
    out = video.write_mp4(source, tmp_path / "clip.mp4", fps=fps)

    assert out == tmp_path / "clip.mp4"
    assert video.read_mp4_info(out) == dict(frames=frames, width=width, height=height,
                                            fps=float(fps))
    # Tolerance: mean abs error < 0.06 (15/255) per channel value; crf 10 on a smooth gradient
    # is far below that, a wrong channel order or frame layout is far above it.
    error = np.abs(read_rgb(out) - source.numpy()).mean()
    assert error < 0.06, error
    assert leftovers(tmp_path) == []


def test_output_is_h264_yuv420p_with_index_first(tmp_path):
    out = video.write_mp4(gradient(3, 16, 16), tmp_path / "clip.mp4")
    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(out)],
                           capture_output=True, text=True)
    assert "Video: h264" in probe.stderr and "yuv420p" in probe.stderr, probe.stderr
    data = out.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")  # +faststart moved the index up front


def test_default_fps_comes_from_config(tmp_path):
    out = video.write_mp4(gradient(2, 16, 16), tmp_path / "clip.mp4")
    assert video.read_mp4_info(out)["fps"] == float(config.FPS)


def test_uint8_numpy_input_and_clamping(tmp_path):
    white = np.full((2, 16, 16, 3), 255, np.uint8)
    assert np.abs(read_rgb(video.write_mp4(white, tmp_path / "u8.mp4")) - 1.0).max() < 0.02
    # Out-of-range floats are clamped, not wrapped around: -3 -> black, 7 -> white.
    over = torch.cat([torch.full((1, 16, 16, 3), -3.0), torch.full((1, 16, 16, 3), 7.0)])
    decoded = read_rgb(video.write_mp4(over, tmp_path / "clamp.mp4"))
    assert decoded[0].max() < 0.02 and decoded[1].min() > 0.98


def test_odd_size_is_padded_by_one_replicated_edge(tmp_path):
    source = gradient(5, 31, 33)
    out = video.write_mp4(source, tmp_path / "odd.mp4")

    info = video.read_mp4_info(out)
    assert (info["frames"], info["width"], info["height"]) == (5, 34, 32)
    decoded = read_rgb(out)
    # Tolerance 0.06 mean abs error, as in the round trip.
    assert np.abs(decoded[:, :31, :33] - source.numpy()).mean() < 0.06
    # The added column/row copy the last ones (not black padding).
    assert np.abs(decoded[:, :31, 33] - source.numpy()[:, :, 32]).mean() < 0.06
    assert np.abs(decoded[:, 31, :33] - source.numpy()[:, 30]).mean() < 0.06


def test_missing_parent_folders_are_created(tmp_path):
    out = video.write_mp4(gradient(2, 16, 16), tmp_path / "a" / "b" / "clip.mp4")
    assert out.is_file()


# ---- no overwrite ----------------------------------------------------------------------------

def test_existing_file_is_kept_unless_overwrite(tmp_path):
    target = tmp_path / "clip.mp4"
    video.write_mp4(gradient(2, 16, 16), target)
    original = target.read_bytes()

    with pytest.raises(FileExistsError, match="overwrite=True") as info:
        video.write_mp4(gradient(4, 32, 32), target)
    assert str(target) in str(info.value)
    assert target.read_bytes() == original
    assert leftovers(tmp_path) == []

    video.write_mp4(gradient(4, 32, 32), target, overwrite=True)
    assert video.read_mp4_info(target)["frames"] == 4


def test_file_appearing_during_encoding_is_not_clobbered(tmp_path, monkeypatch):
    """The final move itself refuses to replace a file created after the up-front check."""
    target = tmp_path / "clip.mp4"
    real_encode = video._encode

    def encode_then_someone_else_saves(*args):
        real_encode(*args)
        target.write_bytes(b"someone else's video")

    monkeypatch.setattr(video, "_encode", encode_then_someone_else_saves)
    with pytest.raises(FileExistsError):
        video.write_mp4(gradient(2, 16, 16), target)
    assert target.read_bytes() == b"someone else's video"
    assert leftovers(tmp_path) == []


def test_publish_without_hard_links_still_refuses_to_clobber(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(video.os, "link", no_links)
    out = video.write_mp4(gradient(2, 16, 16), tmp_path / "clip.mp4")
    assert video.read_mp4_info(out)["frames"] == 2
    original = out.read_bytes()
    monkeypatch.setattr(video, "_check_target", lambda final, overwrite: None)  # reach the move
    with pytest.raises(FileExistsError):
        video.write_mp4(gradient(3, 16, 16), out)
    assert out.read_bytes() == original
    assert leftovers(tmp_path) == []


# ---- failures leave nothing ------------------------------------------------------------------

@pytest.mark.parametrize("error", [RuntimeError("conversion failed"), KeyboardInterrupt()])
def test_failure_mid_encoding_leaves_no_files(tmp_path, monkeypatch, error):
    real_convert = video._frame_to_uint8
    converted = []

    def convert_then_fail(frame):
        if len(converted) == 3:
            raise error
        converted.append(1)
        return real_convert(frame)

    started = []

    class RecordingPopen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(video, "_frame_to_uint8", convert_then_fail)
    monkeypatch.setattr(video.subprocess, "Popen", RecordingPopen)
    with pytest.raises(type(error)):
        video.write_mp4(gradient(8, 16, 16), tmp_path / "clip.mp4")
    assert len(converted) == 3  # it really failed part-way, after ffmpeg got frames
    assert list(tmp_path.iterdir()) == []
    assert len(started) == 1 and started[0].returncode is not None  # ffmpeg killed and reaped


def test_ffmpeg_failure_is_reported_and_leaves_no_files(tmp_path, monkeypatch):
    real_command = video._ffmpeg_command

    def bad_command(*args):
        command = real_command(*args)
        return command[:-1] + ["-no-such-option", "1", command[-1]]

    monkeypatch.setattr(video, "_ffmpeg_command", bad_command)
    with pytest.raises(RuntimeError, match="ffmpeg failed") as info:
        video.write_mp4(gradient(4, 16, 16), tmp_path / "clip.mp4")
    assert "no-such-option" in str(info.value)  # ffmpeg's own message is included
    assert list(tmp_path.iterdir()) == []


def test_sigkilled_writer_never_leaves_the_final_name(tmp_path):
    target = tmp_path / "clip.mp4"
    # The child slows each frame down so it is certainly mid-encoding when killed.
    script = textwrap.dedent(f"""
        import sys, time
        import numpy as np
        from wan22_core import video
        real = video._frame_to_uint8
        count = 0
        def slow(frame):
            global count
            count += 1
            if count == 3:
                print("encoding", flush=True)
            time.sleep(0.05)
            return real(frame)
        video._frame_to_uint8 = slow
        video.write_mp4(np.random.rand(400, 32, 32, 3), {str(target)!r})
    """)
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "encoding"
        assert leftovers(tmp_path), "the child should be writing its hidden temp file"
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    # The orphaned ffmpeg sees EOF on its stdin and finishes the temp file (writes its index);
    # wait for that (at most 10 s), so nothing is still running that could create a file.
    partial = tmp_path / leftovers(tmp_path)[0]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and b"moov" not in partial.read_bytes():
        time.sleep(0.05)
    assert not target.exists()
    # A SIGKILLed process runs no cleanup code, so its hidden temp file may stay behind; it
    # must never carry the final name (and unique_path ignores it).
    assert all(name.startswith(".clip.mp4.") and name.endswith(".partial.mp4")
               for name in os.listdir(tmp_path))


# ---- unwritable folders ----------------------------------------------------------------------

def test_read_only_folder_gives_clear_error(world_readable_dir):
    """A real chmod 555 folder; as root, written from a child running as nobody (root ignores it)."""
    folder = world_readable_dir / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    frames = (gradient(2, 16, 16).numpy() * 255).astype(np.uint8)  # made here: no torch work in the fork
    error = in_unprivileged_child(lambda: video.write_mp4(frames, folder / "clip.mp4"))
    assert error == (f"PermissionError: [Errno {errno.EACCES}] cannot write a video into folder {str(folder)!r}: "
                     f"{os.strerror(errno.EACCES)}; choose a writable output folder or fix its permissions")
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("code,error_type", [(errno.EROFS, OSError),
                                             (errno.EACCES, PermissionError)])
def test_unwritable_folder_gives_clear_error(tmp_path, monkeypatch, code, error_type):
    """Simulated: creating the temp file fails (EROFS, which no chmod gives; EACCES in-process)."""
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(video.os, "open", refusing_open)
    with pytest.raises(error_type, match="cannot write a video into folder") as info:
        video.write_mp4(gradient(2, 16, 16), tmp_path / "clip.mp4")
    assert info.value.errno == code
    assert str(tmp_path) in str(info.value) and os.strerror(code) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_uncreatable_parent_folder_gives_clear_error(tmp_path, monkeypatch):
    def refuse_mkdir(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(video.pathlib.Path, "mkdir", refuse_mkdir)
    with pytest.raises(PermissionError, match="cannot write a video into folder") as info:
        video.write_mp4(gradient(2, 16, 16), tmp_path / "new" / "clip.mp4")
    assert str(tmp_path / "new") in str(info.value)


# ---- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("frames,message", [
    (torch.rand(16, 16, 3), r"\[F, H, W, 3\]"),
    (torch.rand(2, 16, 16, 4), r"\[F, H, W, 3\]"),
    (torch.rand(2, 3, 16, 16), r"\[F, H, W, 3\]"),
    (torch.rand(0, 16, 16, 3), "empty"),
    (torch.full((2, 16, 16, 3), float("nan")), "NaN or inf"),
    (np.full((2, 16, 16, 3), np.inf, np.float32), "NaN or inf"),
    (np.zeros((2, 16, 16, 3), np.int32), "float in \\[0, 1\\] or uint8"),
    ([[[[0.0, 0.0, 0.0]]]], "torch.Tensor or numpy array"),
])
def test_bad_frames_are_rejected(tmp_path, frames, message):
    with pytest.raises(ValueError, match=message):
        video.write_mp4(frames, tmp_path / "clip.mp4")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs,message", [
    (dict(fps=0), "fps"), (dict(fps=float("nan")), "fps"), (dict(crf=60), "crf"),
])
def test_bad_encoder_settings_are_rejected(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        video.write_mp4(gradient(2, 16, 16), tmp_path / "clip.mp4", **kwargs)


def test_folder_as_output_path_is_rejected(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder"):
        video.write_mp4(gradient(2, 16, 16), tmp_path)


def test_read_mp4_info_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        video.read_mp4_info(tmp_path / "nope.mp4")


# ---- unique_path -----------------------------------------------------------------------------

def test_unique_path_counts_up_past_the_highest_used(tmp_path):
    first = video.unique_path(tmp_path, "wan22/video")
    assert first == (tmp_path / "wan22" / "video_00001.mp4").resolve()
    assert first.parent.is_dir()  # subfolder created
    video.write_mp4(gradient(1, 16, 16), first)
    assert video.unique_path(tmp_path, "wan22/video").name == "video_00002.mp4"

    (first.parent / "video_00007.mp4").touch()
    (first.parent / "video_00009_.png").touch()  # ComfyUI names images like this
    (first.parent / "videoX_00050.mp4").touch()  # another prefix
    (first.parent / ".video_00060.mp4.abcd.partial.mp4").touch()  # our temp files don't count
    assert video.unique_path(tmp_path, "wan22/video").name == "video_00010.mp4"
    webm = video.unique_path(tmp_path, "clip", ext=".webm")
    assert webm == (tmp_path / "clip_00001.webm").resolve()


@pytest.mark.parametrize("prefix", ["../evil", "a/../../evil", "/tmp/evil", "", "wan22/"])
def test_unique_path_refuses_prefixes_outside_the_folder(tmp_path, prefix):
    with pytest.raises(ValueError, match="prefix"):
        video.unique_path(tmp_path / "out", prefix)


def test_unique_path_refuses_symlink_escape(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "link").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="outside the output folder"):
        video.unique_path(tmp_path / "out", "link/video")


def test_unique_path_rejects_bad_extension(tmp_path):
    with pytest.raises(ValueError, match="ext"):
        video.unique_path(tmp_path, "video", ext="mp4")
