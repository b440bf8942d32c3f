"""Every ffmpeg / ffprobe call of flipray: the training format's encode settings, stream probing, real lengths.

    from flipray import media
    info = media.probe("my-video.mp4"); media.require_stereo_video(info)   # MediaError(reason, message) if unusable

One vocabulary of reasons (REASONS) serves `flipray check` (its JSON `reason`), `flipray ingest` (its report, in
words: LABELS) and synth. Subprocesses take argument lists, never shell strings. Lengths are measured by decoding
(audio_samples, video_frames), not read from headers: a 0-sample FLAC's header claims 2^63-1 frames.
"""
from __future__ import annotations

import errno
import io
import json
import math
import os
import subprocess
from dataclasses import dataclass, field

from flipray.atomic import atomic_output, write_bytes

# code -> what it means; `flipray check --json` reports the code, ingest's report the LABELS wording
REASONS = {
    "missing": "no such file",
    "empty": "empty file",
    "not-a-video": "not a file ffmpeg can read",
    "corrupt": "damaged or cut short: ffmpeg cannot decode it to the end",
    "no-video": "no video stream",
    "no-audio": "no audio stream",
    "mono": "mono audio",
    "channels": "more than two audio channels",
    "dual-mono": "two identical channels",
    "silent": "silent audio",
    "too-short": "shorter than one window / clip",
}
LABELS = {"missing": "no such file", "empty": "empty file", "not-a-video": "unreadable", "corrupt": "corrupt",
          "no-video": "no video stream", "no-audio": "no audio stream", "mono": "mono audio",
          "channels": "not stereo", "dual-mono": "dual mono", "silent": "silent", "too-short": "too short"}

# The training format (docs/clip-format.md): VP9 with a keyframe every second, 16-bit FLAC
VP9 = ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-row-mt", "1", "-threads", "1",
       "-crf", "30", "-b:v", "0", "-pix_fmt", "yuv420p",
       "-fflags", "+bitexact", "-flags:v", "+bitexact"]  # no random segment id or version strings
FLAC_SUBTYPE = "PCM_16"


class MediaError(Exception):
    """A file that cannot be used; `reason` is a REASONS code, the message says why in words."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def vp9_args(fps: int) -> list[str]:
    """ffmpeg output options of the training format's video: VP9, a keyframe every second."""
    return [*VP9, "-g", str(fps), "-keyint_min", str(fps)]


def flac_args(sample_rate: int, channels: int = 2) -> list[str]:
    """ffmpeg output options of the training format's audio: 16-bit FLAC at `sample_rate`."""
    return ["-ac", str(channels), "-ar", str(sample_rate), "-c:a", "flac", "-sample_fmt", "s16"]


def write_flac(path, audio, sample_rate: int) -> None:
    """Write float audio (channels, samples) as the training format's FLAC (soundfile: bit-exact, no subprocess),
    complete or not at all (encoded in memory, then flipray.atomic: a full disk is an OSError naming the file)."""
    import soundfile as sf
    encoded = io.BytesIO()
    sf.write(encoded, audio.T, sample_rate, subtype=FLAC_SUBTYPE, format="FLAC")
    write_bytes(path, encoded.getvalue())


def write_vp9(path, frames, fps: int) -> None:
    """Write RGB frames (T, H, W, 3) uint8 as the training format's VP9 video, complete or not at all."""
    _, h, w, _ = frames.shape
    with atomic_output(path) as tmp:
        ffmpeg(["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps), "-i", "-", "-an",
                *vp9_args(fps), str(tmp)], stdin=frames.tobytes())


_WRITE_FAILED = ("No space left on device", "Disk quota exceeded", "Error writing trailer", "Error closing file")


class FFmpegError(RuntimeError):
    """ffmpeg exited with an error; `stderr` is what it said."""

    def __init__(self, args: list[str], stderr: str):
        super().__init__(f"ffmpeg {' '.join(args)} failed: {stderr[-2000:]}")
        self.stderr = stderr


def ffmpeg(args: list[str], stdin: bytes | None = None, timeout: float | None = None) -> bytes:
    """Run ffmpeg with an argument list (never a shell string); stdout bytes, or FFmpegError carrying its stderr."""
    proc = subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostats", "-nostdin", "-y", *args],
                          input=stdin, capture_output=True, timeout=timeout)
    stderr = proc.stderr.decode(errors="replace").strip()
    # ffmpeg can exit 0 after failing to write its output (the webm muxer on a full disk, measured): its words count
    if proc.returncode != 0 or any(words in stderr for words in _WRITE_FAILED):
        for code in (errno.ENOSPC, errno.EDQUOT):  # a full disk is no bad input: an OSError, as any writer's
            if os.strerror(code) in stderr:
                raise OSError(code, os.strerror(code), args[-1])
        raise FFmpegError(args, stderr or f"exit status {proc.returncode}")
    return proc.stdout


def _first_words(stderr: bytes | str, fallback: str) -> str:
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else fallback


@dataclass
class Probe:
    path: str
    duration_s: float | None                          # the container's duration, None when it has none
    video: bool                                       # a video stream that is not cover art
    video_duration_s: float | None                    # what the header says of the first one (None: not said)
    audio: list[dict] = field(default_factory=list)   # index, codec_name, channels, bit_rate, sample_rate of each
    video_size: tuple[int, int] | None = None         # the first video stream's width and height as ffmpeg decodes
    pixel_aspect: float = 1.0                         # it (rotation applied), and its pixels' width over height


def file_arg(path) -> str:
    """A file name as an ffmpeg/ffprobe positional argument: "-take.mp4" would be read as an option, "./-take.mp4"
    is the same file."""
    path = str(path)
    return "./" + path if path.startswith("-") else path


def probe(path, timeout: float = 60) -> Probe:
    """What ffprobe says about a file; MediaError missing / empty / not-a-video when it cannot say."""
    path = str(path)
    if not os.path.isfile(path):
        raise MediaError("missing", "a folder, not a file" if os.path.isdir(path) else "no such file")
    if os.path.getsize(path) == 0:
        raise MediaError("empty", "empty file (0 bytes)")
    entries = ("stream=index,codec_type,codec_name,channels,bit_rate,sample_rate,duration,width,height,"
               "sample_aspect_ratio:stream_disposition=attached_pic:stream_side_data=rotation:stream_tags=rotate"
               ":format=duration")
    try:
        proc = subprocess.run(["ffprobe", "-v", "error", "-show_entries", entries, "-of", "json", file_arg(path)],
                              capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise MediaError("not-a-video", f"ffprobe found no answer in {timeout:g} s") from None
    info = json.loads(proc.stdout or b"{}") if proc.returncode == 0 else {}
    streams = info.get("streams", [])
    if proc.returncode != 0 or not streams:
        why = _first_words(proc.stderr, "no streams")
        raise MediaError("not-a-video", f"not a video ffmpeg can read ({why})")
    try:
        duration = float(info.get("format", {}).get("duration", "nan"))
    except ValueError:
        duration = float("nan")
    video = [s for s in streams if s.get("codec_type") == "video" and not s.get("disposition", {}).get("attached_pic")]
    try:
        video_duration = float(video[0].get("duration", "nan")) if video else math.nan
    except ValueError:
        video_duration = math.nan
    audio = [{k: s.get(k) for k in ("index", "codec_name", "channels", "bit_rate", "sample_rate")}
             for s in streams if s.get("codec_type") == "audio"]
    size, pixel_aspect = None, 1.0
    if video and video[0].get("width"):
        size = int(video[0]["width"]), int(video[0]["height"])
        pixel_aspect = _ratio(video[0].get("sample_aspect_ratio"))
        if _rotation(video[0]) % 180 == 90:  # a phone held upright: ffmpeg turns the picture as it decodes
            size, pixel_aspect = size[::-1], 1 / pixel_aspect
    return Probe(path, duration if duration > 0 else None, bool(video),
                 video_duration if video_duration > 0 else None, audio, size, pixel_aspect)


def _rotation(stream: dict) -> int:
    """A video stream's display rotation in degrees, 0-359: the display matrix (ffmpeg 5+) or the older rotate tag."""
    for side in stream.get("side_data_list", []):
        if "rotation" in side:
            return round(float(side["rotation"])) % 360
    try:
        return round(float(stream.get("tags", {}).get("rotate", 0))) % 360
    except ValueError:
        return 0


def _ratio(text: str | None) -> float:
    """ffprobe's "16:15" as 16/15; 1.0 for a missing or unknown ("0:1", "N/A") ratio."""
    try:
        num, den = (float(x) for x in str(text).split(":"))
    except ValueError:
        return 1.0
    return num / den if num > 0 and den > 0 else 1.0


def require_stereo_video(info: Probe, what: str = "check") -> Probe:
    """MediaError no-video / no-audio / mono / channels unless the file has a picture and stereo audio (its first
    audio stream, the one ffmpeg picks); `what` the word for what stereo is needed for."""
    if not info.video:
        raise MediaError("no-video", "no video stream" + (" (audio only)" if info.audio else ""))
    if not info.audio:
        raise MediaError("no-audio", f"no audio stream: nothing to {what}")
    channels = int(info.audio[0].get("channels") or 0)
    if channels == 1:
        raise MediaError("mono", f"mono audio (1 channel): there is no left and right to {what}")
    if channels != 2:
        raise MediaError("channels", f"{channels} audio channels: stereo (2 channels) is required")
    return info


def audio_samples(path, channels: int = 2, timeout: float = 120) -> int:
    """Samples per channel that really decode from the first audio stream (0 when none decode)."""
    proc = subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-i", str(path), "-map",
                           "0:a:0", "-f", "s16le", "-ac", str(channels), "-"], capture_output=True, timeout=timeout)
    return len(proc.stdout) // (2 * channels) if proc.returncode == 0 else 0


def video_frames(path, timeout: float = 120) -> int:
    """Frames (packets) of the first video stream, read to the end (0 when none can be read)."""
    proc = subprocess.run(["ffprobe", "-v", "error", "-count_packets", "-select_streams", "v:0", "-show_entries",
                           "stream=nb_read_packets", "-of", "csv=p=0", file_arg(path)], capture_output=True,
                          timeout=timeout)
    text = proc.stdout.decode().strip()
    return int(text) if proc.returncode == 0 and text.isdigit() else 0
