"""DALI pipeline for the flip pretext task: clips from the store -> the batch dict of `flipray.pretext.data.collate`.

    from dali_pipelines.pretext import DaliClipLoader
    loader = DaliClipLoader(cfg, "train", train=True, root="s3://bucket/ds", batch_size=32, device="gpu",
                            shard_id=rank, num_shards=world_size, epoch=0)
    for batch in loader:               # one epoch; loader.set_epoch(1) for the next
        batch["video"], batch["audio"], batch["label"], batch["clip_id"], batch["start_s"], batch["skipped"]

Same samples as the torchcodec loader: sample k of an epoch is item `EpochSampler(..., rank=shard_id,
world=num_shards).order()[k]` and its window, crop, jitter, flips and label are `flipray.pretext.data.draw_params(...)` for
that item, so `ClipDataset` + `EpochSampler` and this loader yield the same batches (frames within codec tolerance:
DALI converts YUV to RGB with its own filter; waveform within FLAC-decoding float tolerance, so the model's front end
gives the same features: tests/test_dali.py states the tolerance).

How: a per-sample `fn.external_source` callback (`ClipSource`) maps (epoch, position) to an item, draws its
`SampleParams`, fetches the clip's two objects through `flipray.dataset.store` (S3 or a folder) and checks them against the
manifest's sha256 (through the node-local cache when data.cache_dir is set), with data.fetch_threads requests in
flight per process: the positions the process will be asked for next are fetched ahead (`ClipSource.ahead`).
DALI then does the work: `fn.decoders.video` (CPU, or "mixed" = NVDEC on the GPU) decodes only the
window (`start_frame`, `sequence_length`, `stride`), `fn.decoders.audio` the FLAC, and resize, mirror, crop, colour
jitter, normalisation, channel swap and peak normalisation run as DALI operators (on the GPU with device="gpu");
the audio features (log-mel, phase differences, GCC-PHAT) come from the model's torch front end on the training
device. A reader with a fixed file list cannot reshuffle per epoch in `EpochSampler`'s order, so the callback is
the reader; with `py_workers > 0` it runs in that many processes started with `spawn` (safe in Ray
workers and after CUDA initialisation).

Corrupt clips are skipped and counted, never fatal: (1) a clip whose objects are missing, fail their checksum or are
not WebM/FLAC is replaced by a tiny built-in filler and flagged by the callback; (2) a window with fewer frames than
asked (truncated video) or audio much shorter than the manifest says is flagged from the decoded shapes; (3) if a
decoder still fails on a batch, the loader finds the culprit by decoding that batch's clips with torchcodec, marks it
bad and rebuilds the pipeline at that batch. Flagged samples are dropped from the batch and counted in
`batch["skipped"]` and `loader.skipped` (clip_id -> reason), as `ClipDataset` does.
"""
from __future__ import annotations

import base64
import contextlib
import io
import logging
import math
import os
import sys

import numpy as np
import torch

from flipray.config import Config
from flipray.pretext.data import (IMAGENET_MEAN, IMAGENET_STD, ClipDecodeError, EpochSampler, audio_window, decode_audio,
                          decode_video, item_params, num_items, pair_size, window_frame_indices,
                          window_samples_range)
from flipray.dataset.cache import open_store
from flipray.dataset.store import ChecksumError, Store

log = logging.getLogger(__name__)

# Sample status codes, passed from the callback through the pipeline to the loader.
OK, PAD, MISSING, BAD_CHECKSUM, NOT_WEBM, NOT_FLAC, SHORT_VIDEO, SHORT_AUDIO, DECODE_ERROR = range(9)
REASONS = {MISSING: "object missing or unreadable", BAD_CHECKSUM: "checksum mismatch (corrupt object)",
           NOT_WEBM: "video is not WebM/Matroska", NOT_FLAC: "audio is not FLAC",
           SHORT_VIDEO: "video has fewer frames than the window needs (truncated?)",
           SHORT_AUDIO: "audio much shorter than the manifest says (truncated?)",
           DECODE_ERROR: "decoder failed"}
EBML_MAGIC, FLAC_MAGIC = b"\x1a\x45\xdf\xa3", b"fLaC"
OUTPUTS = ["video", "audio", "flags", "info", "n_frames", "n_audio"]  # what the pipeline returns, in order
PREFETCH = 2  # batches the pipeline prepares ahead
AUTOGRAPH_PREFIX = "__autograph_generated_file"  # the modules (and temp files) DALI's conditionals compile

# One black 16x16 VP9 frame in WebM (ffmpeg -f lavfi -i color=black:s=16x16 -frames:v 1 -c:v libvpx-vp9): what the
# pipeline decodes in place of a clip that failed its checks, so that the batch keeps its size.
_FILLER_WEBM = base64.b64decode(
    "GkXfo59ChoEBQveBAULygQRC84EIQoKEd2VibUKHgQJChYECGFOAZwEAAAAAAAHlEU2bdLpNu4tTq4QVSalmU6yBoU27i1OrhBZUrmtTrIHYTbuM"
    "U6uEElTDZ1OsggEeTbuMU6uEHFO7a1OsggHP7AEAAAAAAABZAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAVSalmsirXsYMPQkBNgI1MYXZmNTkuMjcuMTAwV0GNTGF2ZjU5LjI3LjEw"
    "MESJiEBk4AAAAAAAFlSua8GuAQAAAAAAADjXgQFzxYgAJH4m0UOb55yBACK1nIN1bmSIgQCGhVZfVlA5g4EBI+ODhAnvIargibCBELqBEJqBAhJU"
    "w2dAgXNzoGPAgGfImkWjh0VOQ09ERVJEh41MYXZmNTkuMjcuMTAwc3PbY8CLY8WIACR+JtFDm+dnyKVFo4dFTkNPREVSRIeYTGF2YzU5LjM3LjEw"
    "MCBsaWJ2cHgtdnA5Z8iiRaOIRFVSQVRJT05Eh5QwMDowMDowMC4xNjcwMDAwMDAAAB9DtnWl54EAo6CBAACAgkmDQgAA8AD2ADgkHBhKAAAwYAAA"
    "EL///UiMABxTu2uRu4+zgQC3iveBAfGCAaXwgQM=")


def _filler_flac(sample_rate: int) -> bytes:
    import soundfile as sf
    buf = io.BytesIO()
    sf.write(buf, np.zeros((160, 2), np.int16), sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def frame_stride(cfg: Config) -> int:
    """The decoder's stride: `window_frame_indices` are start + i*stride for every preset (18/18, 9/18, 6/18)."""
    offsets = [i - window_frame_indices(cfg, 0)[0] for i in window_frame_indices(cfg, 0)]
    stride = offsets[1] if len(offsets) > 1 else 1
    if offsets != [i * stride for i in range(len(offsets))]:
        raise ValueError(f"data.num_frames={cfg.data.num_frames} does not divide the {cfg.window_frames}-frame window "
                         f"evenly; the DALI loader decodes start_frame + i*stride (use a divisor, or the torchcodec "
                         f"loader)")
    return stride


class ClipSource:
    """The per-sample `fn.external_source` callback: (epoch, position) -> encoded clip + every random choice.

    Stateless apart from caches, as DALI's parallel mode requires: the answer depends only on the SampleInfo.
    Positions past the epoch's end, up to a whole batch, return flagged fillers (PAD): DALI drops a partial
    batch when the callback stops mid-batch, so the epoch is padded to whole batches and the loader drops the pads.
    EpochSampler's own pads (item -1 - i) decode item i and come out with weight 0. `start` is the global position
    of the first epoch (EpochSampler's), `skip` this shard's samples already served from there (a rebuild).
    The objects of the next positions this process serves are fetched ahead on data.fetch_threads threads (only
    bytes move early: every draw is still made from the SampleInfo alone).
    """

    def __init__(self, cfg: Config, clips: list[dict], root: str, seed: int, train: bool, shuffle: bool,
                 shard_id: int, num_shards: int, batch_size: int, first_epoch: int, start: int,
                 bad: dict[str, int] | None = None, py_workers: int = 0, step_size: int | None = None,
                 skip: int = 0):
        self.cfg, self.clips, self.seed, self.train = cfg, clips, seed, train
        self.store = open_store(root, cfg.data.cache_dir, cfg.data.cache_gb)
        self.shuffle, self.shard_id, self.num_shards, self.batch_size = shuffle, shard_id, num_shards, batch_size
        self.first_epoch, self.start, self.bad = first_epoch, start, dict(bad or {})
        self.py_workers, self.step_size, self.skip = py_workers, step_size, skip
        self.n_items = num_items(len(clips), cfg, train)
        self._orders: dict[int, list[int]] = {}
        self._filler_audio = None
        self._pool = None
        self._pending: dict[tuple[int, int], object] = {}  # (epoch, position) -> Future of fetch_item

    def __getstate__(self):
        return {**self.__dict__, "_orders": {}, "_pool": None, "_pending": {}}

    def order(self, epoch: int) -> list[int]:
        """This shard's items of `epoch`, from the start position on (EpochSampler's order exactly)."""
        if epoch not in self._orders:
            first = epoch == self.first_epoch
            order = EpochSampler(self.n_items, self.seed, epoch, self.shuffle, self.shard_id, self.num_shards,
                                 self.start if first else 0, self.step_size, pair_size(self.cfg, self.train)).order()
            self._orders = {epoch: order[self.skip:] if first else order}
        return self._orders[epoch]

    def num_batches(self, epoch: int) -> int:
        return math.ceil(len(self.order(epoch)) / self.batch_size)

    def item(self, item: int, epoch: int):
        """(clip index, SampleParams) of dataset item `item` (an EpochSampler pad -1 - i: item i), exactly as
        ClipDataset.__getitem__ draws them."""
        return item_params(self.cfg, self.clips, self.seed, epoch, item if item >= 0 else -1 - item, self.train)

    def fetch(self, clip: dict) -> tuple[bytes, bytes, int]:
        """The clip's video and audio bytes and a status code. A missing, corrupt or foreign object is a status;
        anything else (no network, no credentials) raises, since skipping every clip would hide it."""
        if clip["clip_id"] in self.bad:
            return b"", b"", self.bad[clip["clip_id"]]
        try:
            video = self.store.get(clip["video"], clip.get("video_sha256"))
            audio = self.store.get(clip["audio"], clip.get("audio_sha256"))
        except FileNotFoundError as e:
            log.warning("clip %s: %s", clip["clip_id"], e)
            return b"", b"", MISSING
        except ChecksumError as e:
            log.warning("clip %s: %s", clip["clip_id"], e)
            return b"", b"", BAD_CHECKSUM
        if video[:4] != EBML_MAGIC:
            return b"", b"", NOT_WEBM
        if audio[:4] != FLAC_MAGIC:
            return b"", b"", NOT_FLAC
        return video, audio, OK

    def fetch_item(self, item: int, epoch: int) -> tuple[bytes, bytes, int]:
        """fetch() of the clip item `item` shows and of the clip whose audio it hears (the mismatch negative's)."""
        ci, p = self.item(item, epoch)
        video, audio, code = self.fetch(self.clips[ci])
        audio_ci = audio_window(self.cfg, ci, p)[0]
        if code == OK and audio_ci != ci:
            _, audio, code = self.fetch(self.clips[audio_ci])
        return video, audio, code

    def ahead(self, epoch: int, k: int) -> range:
        """Positions of `epoch` this process will be asked for from `k` on, at most data.fetch_threads of them.
        Inline (py_workers=0) one process serves every position in order. In parallel mode DALI splits each batch
        into py_workers contiguous chunks and a worker serves one chunk in order (nvidia/dali/_multiproc/pool.py,
        `_split_work`), so the window stops at the end of k's chunk: no object is fetched by two workers."""
        end = k + self.cfg.data.fetch_threads
        if self.py_workers > 0:
            b, i = divmod(k, self.batch_size)
            size, extra = divmod(self.batch_size, self.py_workers)
            bounds = [0]
            for w in range(self.py_workers):
                bounds.append(bounds[-1] + size + (w < extra))
            end = min(end, b * self.batch_size + next(x for x in bounds if x > i))
        return range(k, min(end, len(self.order(epoch))))

    def _fetch_ahead(self, item: int, epoch: int, k: int) -> tuple[bytes, bytes, int]:
        """fetch_item() of position k, with the next positions' requests already in flight."""
        if self.cfg.data.fetch_threads <= 1:
            return self.fetch_item(item, epoch)
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(self.cfg.data.fetch_threads, thread_name_prefix="flipray-fetch")
        window = self.ahead(epoch, k)
        for key in [key for key in self._pending if key[0] != epoch or key[1] not in window]:
            self._pending.pop(key).cancel()  # a jump (new epoch, resume): what was fetched ahead is not needed
        order = self.order(epoch)
        for pos in window:
            if (epoch, pos) not in self._pending:
                self._pending[(epoch, pos)] = self._pool.submit(self.fetch_item, order[pos], epoch)
        return self._pending.pop((epoch, k)).result()

    def __call__(self, info):
        epoch = self.first_epoch + info.epoch_idx
        order = self.order(epoch)
        k = info.idx_in_epoch
        if k >= self.num_batches(epoch) * self.batch_size:
            raise StopIteration
        item = order[k] if k < len(order) else None
        if item is None:
            ci, p, video, audio, code = 0, None, b"", b"", PAD
        else:
            ci, p = self.item(item, epoch)
            video, audio, code = self._fetch_ahead(item, epoch, k)
            audio_start = audio_window(self.cfg, ci, p)[1]
        if code != OK:  # decode the filler instead; the loader drops the sample
            if self._filler_audio is None:
                self._filler_audio = _filler_flac(self.cfg.data.sample_rate)
            video, audio, start, audio_start, crop, flags = _FILLER_WEBM, self._filler_audio, 0, 0, (0, 0), (0, 0, 0)
            aug = (1 / 255, 1 / 255, 0.0, 0.0)
        else:
            start = p.start_frame
            crop = (p.crop_y, p.crop_x)
            # augment_frames on u in 0..255: x1 = b*u/255; g = grey(x1); x2 = c*x1 + (1-c)*mean(g);
            # x3 = s*x2 + (1-s)*g  =  (s*c*b/255)*u + s*(1-c)*mean(g) + (1-s)*g   (then clamp, normalise)
            b, c, sat = p.brightness, p.contrast, p.saturation
            aug = (b / 255, sat * c * b / 255, sat * (1 - c), 1 - sat)
            # joint flip mirrors the frames and swaps the channels; the flip task's negative swaps them (again)
            flip_negative = p.swap and self.cfg.train.task == "flip"
            flags = (int(p.joint_flip), int(p.joint_flip != flip_negative), int(p.label))
        s0 = window_samples_range(self.cfg, audio_start)[0]
        return (np.frombuffer(video, np.uint8), np.frombuffer(audio, np.uint8), np.array(start, np.int32),
                np.array([s0], np.int32), np.array(crop, np.int32), np.array(aug, np.float32),
                np.array(flags, np.int32), np.array([ci, -1 if item is None else item, code, start], np.int64))


def fit_square(frames, side: int):
    """(F, H, W, C) frames (a DALI DataNode) to `side` x `side`, as flipray.pretext.data.resize_square's default fit: a
    wide frame squashed whole, a tall one cropped to its centre square; antialiased linear resize, rounded to uint8
    levels."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    shape = frames.shape()
    short = fn.cast(dmath.min(shape[1], shape[2]), dtype=types.FLOAT)
    frames = fn.crop(frames, crop_h=short, crop_w=fn.cast(shape[2], dtype=types.FLOAT))
    return fn.resize(frames, resize_x=side, resize_y=side, antialias=True, interp_type=types.INTERP_LINEAR,
                     dtype=types.UINT8)


def build_pipeline(cfg: Config, source: ClipSource, device: str = "cpu", batch_size: int = 32,
                   num_threads: int = 2, device_id: int = 0, py_workers: int = 0):
    """The pretext pipeline (built, not started); its outputs are OUTPUTS:
    video (B,T,3,crop,crop) float, audio (B,2,samples) peak-normalised waveform, flags (B,3), info (B,4), n_frames,
    n_audio."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    if cfg.data.audio_channels != 2 or cfg.train.task == "rotate":
        raise ValueError("360 clips (data.audio_channels=4, train.task=rotate: FOA rotation, panorama roll, intensity "
                         "vectors) are not in the DALI pipeline yet; use data.loader=torchcodec")
    d = cfg.data
    T, stride, R = d.num_frames, frame_stride(cfg), d.resize
    gpu = device == "gpu"

    # enable_conditionals: the `if` below runs per sample, so clips stored at the training size skip the resize
    @pipeline_def(enable_conditionals=True)
    def pretext():
        video_b, audio_b, start, s0, crop_yx, aug, flags, info = fn.external_source(
            source=source, num_outputs=8, batch=False, parallel=py_workers > 0,
            dtype=[types.UINT8, types.UINT8, types.INT32, types.INT32, types.INT32, types.FLOAT, types.INT32,
                   types.INT64],
            ndim=[1, 1, 0, 1, 1, 1, 1, 1])

        # Video: decode only the window; pad_mode="none" returns fewer frames for a truncated clip (flagged later)
        frames = fn.decoders.video(video_b, device="mixed" if gpu else "cpu", start_frame=start,
                                   sequence_length=T, stride=stride, pad_mode="none")
        n_frames = frames.shape()
        frames = fn.pad(frames, axes=(0,), shape=(T,))  # uniform shapes; short samples are dropped anyway
        if (n_frames[1] != R) | (n_frames[2] != R):
            frames = fit_square(frames, R)
        frames = fn.flip(frames, horizontal=flags[0])  # joint flip: mirror, then crop, as flipray.pretext.data does
        frames = fn.slice(frames, start=crop_yx, shape=[d.crop, d.crop], axis_names="HW")  # pixel offsets
        if gpu:  # per-sample factors join GPU arithmetic on the GPU
            aug = aug.gpu()
        # augment_frames' brightness, contrast and saturation folded into one pass (see ClipSource.__call__):
        # x = A*u + B*mean(g) + C*g, with g the grey of the brightened frame (in [0, 1]), u the frame in 0..255
        grey = fn.coord_transform(frames, M=[0.299, 0.587, 0.114], dtype=types.FLOAT) * aug[0]
        mean = fn.reductions.mean(grey, axes=(1, 2), keep_dims=True)  # per frame
        x = dmath.clamp(aug[1] * frames + aug[2] * mean + aug[3] * grey, 0.0, 1.0)
        video = fn.crop_mirror_normalize(x, mean=IMAGENET_MEAN.flatten().tolist(),
                                         std=IMAGENET_STD.flatten().tolist(), output_layout="FCHW",
                                         dtype=types.FLOAT)

        # Audio: decode the FLAC (CPU only), cut the window, swap channels, peak-normalise. The features come from
        # the model's torch front end on the training device (DALI's spectrogram has no phase), as for torchcodec.
        wave, _ = fn.decoders.audio(audio_b, sample_rate=d.sample_rate, downmix=False, dtype=types.FLOAT)
        n_audio = wave.shape()
        wave = fn.slice(wave, start=s0, shape=[cfg.window_samples], axes=(0,), out_of_bounds_policy="pad")
        swap = fn.cast(flags[1], dtype=types.FLOAT)
        if gpu:
            wave, swap = wave.gpu(), swap.gpu()
        left, right = wave[:, 0], wave[:, 1]
        left, right = left * (1.0 - swap) + right * swap, right * (1.0 - swap) + left * swap
        peak = dmath.max(dmath.max(fn.reductions.max(dmath.abs(left)), fn.reductions.max(dmath.abs(right))), 1e-3)
        audio = fn.stack(left / peak, right / peak, axis=0)  # peak_normalise: both channels by the louder one's peak
        return video, audio, flags, info, n_frames, n_audio

    generated = {name for name in sys.modules if name.startswith(AUTOGRAPH_PREFIX)}
    pipe = pretext(batch_size=batch_size, num_threads=num_threads, device_id=device_id if gpu else None,
                   py_num_workers=max(py_workers, 1), py_start_method="spawn", prefetch_queue_depth=PREFETCH)
    # The conditionals compile `pretext` through DALI's AutoGraph, which writes the converted source to the system temp
    # folder and deletes it at exit only: every Ray worker killed mid-run left one behind. The module is loaded now.
    for name, module in list(sys.modules.items()):
        if name.startswith(AUTOGRAPH_PREFIX) and name not in generated:
            with contextlib.suppress(OSError):
                os.remove(module.__file__)
    return pipe


class DaliClipLoader:
    """One split of a dataset (folder or s3://) through the DALI pipeline: iterate for one epoch's batches.

    `shard_id`/`num_shards` take this rank's share of each epoch (EpochSampler's per-rank order in steps of
    `step_size` positions, padded so every rank gets the same count); `shuffle` reorders per epoch from `seed`;
    `start` (a global position, a step boundary) resumes mid-epoch. The batch dict is
    `flipray.pretext.data.collate`'s. device="gpu" decodes video on NVDEC and returns CUDA tensors; "cpu" runs anywhere.
    """

    def __init__(self, cfg: Config, split: str, train: bool, root: str | None = None, batch_size: int | None = None,
                 device: str = "cpu", shard_id: int = 0, num_shards: int = 1, shuffle: bool | None = None,
                 seed: int | None = None, epoch: int = 0, start: int = 0, num_threads: int = 2,
                 py_workers: int = 0, device_id: int = 0, step_size: int | None = None):
        self.cfg, self.split, self.train, self.device = cfg, split, train, device
        self.root = str(root or cfg.data.root)
        self.clips = Store(self.root).read_manifest(split)
        if not self.clips:
            raise ValueError(f"{self.root}: no clips in split {split!r}")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id must be in 0..{num_shards - 1}, got {shard_id}")
        self.batch_size = batch_size or cfg.train.batch_size
        self.seed = cfg.train.seed if seed is None else seed
        self.shuffle = train if shuffle is None else shuffle
        self.shard_id, self.num_shards = shard_id, num_shards
        self.num_threads, self.py_workers, self.device_id = num_threads, py_workers, device_id
        self.bad: dict[str, int] = {}        # clip_id -> status code, for clips the decoders choked on
        self.skipped: dict[str, str] = {}    # clip_id -> reason, as ClipDataset.skipped
        self.epoch, self.start, self.step_size = epoch, start, step_size
        self._pipe = self._iter = None
        self._pipe_epoch, self._fresh = None, False  # the epoch the built pipeline produces next; not yet begun

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self._make_source(self.epoch, self.start).num_batches(self.epoch)

    def _make_source(self, epoch: int, start: int, skip: int = 0) -> ClipSource:
        return ClipSource(self.cfg, self.clips, self.root, self.seed, self.train, self.shuffle, self.shard_id,
                          self.num_shards, self.batch_size, epoch, start, self.bad, self.py_workers,
                          self.step_size, skip)

    def _build(self, epoch: int, start: int, skip: int = 0) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
        self.close()
        self._pipe = build_pipeline(self.cfg, self._make_source(epoch, start, skip), self.device, self.batch_size,
                                    self.num_threads, self.device_id, self.py_workers)
        self._pipe.build()
        # prepare_first_batch=False: the first run happens in __iter__, where decoder errors are handled
        self._iter = DALIGenericIterator(self._pipe, OUTPUTS, auto_reset=False, prepare_first_batch=False)
        self._pipe_epoch, self._fresh = epoch, True

    def close(self) -> None:
        """Stop the pipeline and its worker processes."""
        self._iter = self._pipe = None  # DALI shuts workers down when the pipeline is collected

    def __iter__(self):
        epoch, start, pos = self.epoch, self.start, 0  # pos: this shard's samples served since `start`
        # The built pipeline runs on into the next epoch; rebuild only to jump elsewhere (resume, new epoch order).
        if not (self._iter is not None and self._fresh and self._pipe_epoch == epoch and start == 0):
            self._build(epoch, start)
        self._fresh = False
        while True:
            try:
                out = next(self._iter)[0]
            except StopIteration:
                self._iter.reset()
                self._pipe_epoch, self._fresh = epoch + 1, True
                break
            except RuntimeError as e:  # a decoder failed on a clip that passed the callback's checks
                self._find_bad(epoch, start, pos, e)
                self._build(epoch, start, pos)
                self._fresh = False
                continue
            batch, n = self._to_batch(out)
            pos += n
            if batch is not None:
                yield batch
        self.epoch, self.start = epoch + 1, 0

    def _to_batch(self, out: dict) -> tuple[dict | None, int]:
        """DALI outputs -> collate's dict; returns (batch or None when only padding, samples consumed)."""
        info = out["info"].cpu()
        n_frames = out["n_frames"].cpu()[:, 0]
        n_audio = out["n_audio"].cpu()[:, 0]
        code = info[:, 2].clone()
        real = code != PAD
        for i in range(len(code)):
            if code[i] != OK or not real[i]:
                continue
            clip = self.clips[int(info[i, 0])]
            if n_frames[i] < self.cfg.data.num_frames:
                code[i] = SHORT_VIDEO
            elif n_audio[i] < 0.95 * clip["duration_s"] * self.cfg.data.sample_rate:
                code[i] = SHORT_AUDIO
        for i in torch.nonzero(real & (code != OK)).flatten().tolist():
            clip_id = self.clips[int(info[i, 0])]["clip_id"]
            reason = REASONS.get(int(code[i]), f"status {int(code[i])}")
            if clip_id not in self.skipped:
                log.warning("skipping clip %s: %s", clip_id, reason)
            self.skipped[clip_id] = reason
        keep = torch.nonzero(code == OK).flatten()
        consumed = int(real.sum())
        batch = {"skipped": consumed - len(keep)}
        if consumed == 0:
            return None, 0
        if len(keep) == 0:
            return batch, consumed
        idx = keep.to(out["video"].device)
        batch["video"] = out["video"][idx]
        batch["audio"] = out["audio"][idx]
        batch["label"] = out["flags"][keep, 2].float()
        batch["clip_id"] = [self.clips[int(info[i, 0])]["clip_id"] for i in keep.tolist()]
        batch["start_s"] = info[keep, 3].float() / self.cfg.data.fps
        item = info[keep, 1]
        batch["item"] = torch.where(item >= 0, item, -1 - item)
        batch["weight"] = (item >= 0).float()  # EpochSampler's pads: in the pass (DDP), out of the loss
        return batch, consumed

    def _find_bad(self, epoch: int, start: int, pos: int, err: Exception) -> None:
        """Decode the clips of the failed batch with torchcodec; mark those that fail as bad, or re-raise.

        The pipeline runs PREFETCH batches ahead, so the clip at fault may sit in one of the next batches too.
        """
        source = self._make_source(epoch, start)
        order = source.order(epoch)[pos:pos + self.batch_size * (PREFETCH + 1)]
        found = []
        for item in order:
            ci, p = source.item(item if item >= 0 else -1 - item, epoch)
            clip = self.clips[ci]
            video, audio, code = source.fetch(clip)
            if code != OK:
                continue
            try:
                decode_video(video, window_frame_indices(self.cfg, p.start_frame), expect_frames=clip["num_frames"])
                decode_audio(audio, self.cfg.data.sample_rate, channels=2, expect_seconds=clip["duration_s"])
            except ClipDecodeError:
                self.bad[clip["clip_id"]] = DECODE_ERROR
                found.append(clip["clip_id"])
        if not found:
            raise RuntimeError(f"DALI failed on the batch at position {pos} of epoch {epoch} ({self.root}), and "
                               f"torchcodec decodes all its clips: {err}") from err
        log.warning("decoder failed on %s; rebuilding the pipeline without them", found)


def make_split_loader(cfg: Config, split: str, train: bool, batch_size: int | None = None, root: str | None = None,
                shard_id: int = 0, num_shards: int = 1, epoch: int = 0, start: int = 0, device: str = "cpu"):
    """One epoch's batches of `split` from the loader `cfg.data.loader` names: "dali" (DaliClipLoader on `device`)
    or "torchcodec" (ClipDataset + EpochSampler in a DataLoader with cfg.data.num_workers workers). Both yield the
    same batch dict with the same samples; a DaliClipLoader can also be kept and moved on with set_epoch()."""
    batch_size = batch_size or cfg.train.batch_size
    if cfg.data.loader == "dali":
        return DaliClipLoader(cfg, split, train, root=root, batch_size=batch_size, device=device, shard_id=shard_id,
                              num_shards=num_shards, epoch=epoch, start=start)
    if cfg.data.loader != "torchcodec":
        raise ValueError(f"data.loader must be 'torchcodec' or 'dali', got {cfg.data.loader!r}")
    from torch.utils.data import DataLoader

    from flipray.pretext.data import ClipDataset, collate
    ds = ClipDataset(cfg, split, train=train, root=root)
    sampler = EpochSampler(len(ds), ds.seed, epoch, shuffle=train, rank=shard_id, world=num_shards, start=start,
                           group=pair_size(cfg, train))
    workers = cfg.data.num_workers
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=workers,
                      multiprocessing_context="spawn" if workers else None)
