"""Flip accuracy by capture type (binaural, spaced, coincident, phone): trained models against the classical GCC-PHAT
and level-difference baselines on the same windows, and `flipray check` on 3-s H.264/AAC cuts of the same clips.

    python -m bench.capture_eval --data data/heldout --split test --model runs/a/checkpoint.pt --model runs/b/checkpoint.pt \
        --json-out docs/results/capture.json --md-out docs/results/capture.md

Windows: data.eval_windows fixed windows per clip (as the pretext evaluation), each scored as recorded and swapped.
Baselines: the window's audio cue (flipray.cues: GCC-PHAT delay sign, level difference sign) against the side of the
loudest sounding object in the sidecar (an oracle picture side, which favours the baselines); no cue (no coherent
delay, no level difference) or no side counts as a coin flip (0.5). Check: for each clip, a 3-s cut starting at
0.5 s, re-encoded H.264 + AAC 128 kb/s 48 kHz, as recorded and with its channels swapped, through
flipray.check.check_file with its default options; undecidable counts as wrong in `right`, and `right_decided` is
the accuracy among decided videos. Capture groups come from the sidecars (flipray.synth.scenes.capture_group).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import soundfile as sf
import torch

from flipray import check
from flipray.config import apply_overrides
from flipray.cues import audio_cues
from flipray.pretext.data import ClipDataset, EpochSampler, decode_audio, item_params, window_samples_range
from flipray.pretext.train import evaluate, make_loader
from flipray.tracking import load_pretrained
from flipray.synth.scenes import capture_group


def picture_side(meta: dict, start_frame: int, frames: int) -> int:
    """Side (-1 left, 1 right, 0 centre) of the loudest sounding object over the window's frames, from the sidecar."""
    sounding = [o for o in meta["objects"] if o["sounding"]]
    if not sounding:
        return 0
    obj = max(sounding, key=lambda o: o.get("level_db") or 0.0)
    az = obj["azimuth_deg"][start_frame:start_frame + frames]
    mean = sum(az) / max(len(az), 1)
    return 0 if abs(mean) < 1.0 else (1 if mean > 0 else -1)


def _tally(table: dict, group: str, key: str, value: float):
    t = table.setdefault(group, {}).setdefault(key, [0.0, 0])
    t[0] += value
    t[1] += 1


def _tally_verdict(table: dict, group: str, verdict: str, truth: str):
    """right (undecidable counts wrong), undecidable, and right among the decided videos."""
    _tally(table, group, "right", float(verdict == truth))
    _tally(table, group, "undecidable", float(verdict == "undecidable"))
    if verdict != "undecidable":
        _tally(table, group, "right_decided", float(verdict == truth))


def _finish(table: dict) -> dict:
    return {g: {k: {"acc": round(v[0] / v[1], 4), "n": v[1]} for k, v in d.items()} for g, d in sorted(table.items())}


def baselines(ds: ClipDataset) -> dict:
    """GCC-PHAT and level-difference flip accuracy per capture group on the dataset's evaluation windows."""
    cfg, table = ds.cfg, {}
    groups = ds.capture_groups()
    metas = {c["clip_id"]: json.loads((ds.root / c["meta"]).read_text()) for c in ds.clips}
    waves = {}
    for item in range(len(ds)):
        ci, p = item_params(cfg, ds.clips, ds.seed, 0, item, train=False)
        clip = ds.clips[ci]
        if clip["clip_id"] not in waves:
            waves = {clip["clip_id"]: decode_audio(ds.root / clip["audio"], cfg.data.sample_rate)}
        s0, s1 = window_samples_range(cfg, p.start_frame)
        cues = audio_cues(waves[clip["clip_id"]][:, s0:s1], cfg.data.sample_rate)
        seen = picture_side(metas[clip["clip_id"]], p.start_frame, cfg.window_frames)
        for name, key in (("gcc-phat", "gcc_side"), ("level-difference", "level_side")):
            heard = -cues[key] if p.swap else cues[key]  # swapping the channels mirrors every cue
            score = 0.5 if heard == 0 or seen == 0 else float((heard != seen) == p.swap)
            _tally(table, groups[clip["clip_id"]], name, score)
    return table


CUT_S = 3.0  # the short videos `flipray check` is measured on


def cut(clip: dict, root: Path, out: Path, swap: bool, start_s: float = 0.5, seconds: float = CUT_S) -> Path:
    """A 3-s H.264/AAC mp4 of a clip (channels swapped if asked)."""
    wave, sr = sf.read(root / clip["audio"], dtype="float32")
    wav = out.with_suffix(".wav")
    sf.write(wav, wave[:, ::-1] if swap else wave, sr)
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-ss", str(start_s), "-t",
                    str(seconds), "-i", str(root / clip["video"]), "-ss", str(start_s), "-t", str(seconds), "-i",
                    str(wav), "-map", "0:v", "-map", "1:a", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt",
                    "yuv420p", "-c:a", "aac", "-b:a", "128k", "-ar", "48000", str(out)], check=True)
    wav.unlink()
    return out


def run(data: str, split: str, models: list[str], eval_windows: int, check_clips: int, threads: int,
        frame_fit: str = check.CheckOptions.frame_fit) -> dict:
    torch.set_num_threads(threads)
    root = Path(data)
    report = {"data": data, "split": split, "eval_windows": eval_windows, "models": {}, "threads": threads,
              "frame_fit": frame_fit}
    t0 = time.time()
    base_ds = None
    for named in models:
        name, spec = named.split("=", 1) if "=" in named.split("/")[0] else (named, named)
        model, cfg = load_pretrained(spec)  # a checkpoint, a run folder or models:/NAME/VERSION
        cfg = apply_overrides(cfg, [f"data.root={data}", "data.cache=false", f"data.eval_windows={eval_windows}",
                                    "data.num_workers=0"])
        ds = ClipDataset(cfg, None if split == "all" else split, train=False)  # all: a held-out set, every split
        groups = ds.capture_groups()
        res = evaluate(model, make_loader(ds, cfg, EpochSampler(len(ds), cfg.train.seed, shuffle=False), 16), "cpu",
                       groups)
        entry = {"model": spec, "front_end": cfg.model.front_end, "norm": cfg.model.norm,
                 "audio_head": cfg.model.audio_head, "acc": round(res["acc"], 4), "n": res["n"],
                 "acc_by_capture": {g: {"acc": round(v["acc"], 4), "n": v["n"]} for g, v in res["acc_by_capture"].items()}}
        if check_clips:
            entry["check_cuts"] = []
            entry["check"] = check_eval(model, cfg, ds.clips[:check_clips], root, groups, entry["check_cuts"],
                                        check.CheckOptions(frame_fit=frame_fit))
        report["models"][name] = entry
        base_ds = base_ds or ds
        print(f"{name}: {entry['acc_by_capture']}", file=sys.stderr)
    report["baselines"] = _finish(baselines(base_ds))
    report["wall_s"] = round(time.time() - t0, 1)
    return report


SCENE_KINDS = ("one source", "one source + silent objects", "two sources")


def scene_kind(meta: dict) -> str:
    """What the picture asks of the model: one sounding object alone, one among silent objects (which one sounds?),
    or two sounding objects (which sound is whose?)."""
    sounding = sum(o["sounding"] for o in meta["objects"])
    if sounding > 1:
        return "two sources"
    return "one source" if len(meta["objects"]) == sounding else "one source + silent objects"


def check_eval(model, cfg, clips: list[dict], root: Path, groups: dict, cuts: list | None = None,
               opts: check.CheckOptions | None = None) -> dict:
    """`flipray check` on 3-s cuts of `clips`, tallied per capture group, over "all" and per scene kind ("by_scene");
    each cut's record (group, scene kind, truth, window probabilities, cues) is appended to `cuts` when given, so
    decision rules can be compared offline."""
    table, by_scene = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for clip in clips:
            g, kind = groups[clip["clip_id"]], scene_kind(json.loads((root / clip["meta"]).read_text()))
            for swap in (False, True):
                path = cut(clip, root, Path(tmp) / f"{clip['clip_id']}-{int(swap)}.mp4", swap)
                r = check.check_file(path, model, cfg, opts)
                truth = "swapped" if swap else "correct"
                if cuts is not None:
                    cuts.append({"clip_id": clip["clip_id"], "group": g, "scene": kind, "swapped": swap,
                                 "verdict": r.verdict, "timeline": r.timeline, "cues": r.cues, "error": r.error})
                for group in (g, "all"):
                    _tally_verdict(table, group, r.verdict, truth)
                _tally_verdict(by_scene, kind, r.verdict, truth)
                if r.cues:
                    _tally(table, g, "capture_guess_right", float(r.cues["capture_guess"] == g))
    return {**_finish(table), "by_scene": _finish(by_scene)}


def replay(cuts: list[dict], opts: check.CheckOptions, window_s: float) -> dict:
    """The check table of stored cuts (check_eval's records) under other decision options: right, undecidable and
    right_decided per capture group and over "all", without scoring anything again."""
    table = {}
    for c in cuts:
        if c["error"] or not c["timeline"]:
            continue
        verdict = check.decide(c["timeline"], opts, window_s, CUT_S)[0]
        for group in (c["group"], "all"):
            _tally_verdict(table, group, verdict, "swapped" if c["swapped"] else "correct")
    return _finish(table)


def describe(m: dict) -> str:
    """A model's inputs and the authors' options where it uses them: "ipd-gcc", "logmel, batchrenorm, conv head"."""
    parts = [m["front_end"]] + ([m["norm"]] if m.get("norm", "batchnorm") != "batchnorm" else []) + \
        ([f"{m['audio_head']} head"] if m.get("audio_head", "conv-bn-relu") != "conv-bn-relu" else [])
    return ", ".join(parts)


def markdown(report: dict) -> str:
    groups = ("binaural", "spaced", "coincident", "phone", "all")
    lines = [f"Flip accuracy by capture type, `{report['data']}` split `{report['split']}` "
             f"({report['eval_windows']} windows per clip, each as recorded and swapped)", "",
             "| row | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]

    def cell(d, key=None):
        if d is None:
            return ""
        d = d[key] if key else d
        return f"{d['acc']:.3f} ({d['n']})"
    for name, m in report["models"].items():
        by_capture = {**m["acc_by_capture"], "all": {"acc": m["acc"], "n": m["n"]}}
        lines.append(f"| model `{name}` ({describe(m)}) | " +
                     " | ".join(cell(by_capture.get(g)) for g in groups) + " |")
    for name in ("gcc-phat", "level-difference"):
        lines.append(f"| {name} (oracle picture side) | " +
                     " | ".join(cell(report["baselines"].get(g, {}).get(name)) for g in groups) + " |")
    for name, m in report["models"].items():
        if "check" not in m:
            continue
        for key in ("right", "undecidable", "right_decided", "capture_guess_right"):
            lines.append(f"| check 3-s H.264/AAC, `{name}`: {key} | " +
                         " | ".join(cell(m["check"].get(g, {}).get(key)) for g in groups) + " |")
    checked = {name: m["check"]["by_scene"] for name, m in report["models"].items() if "by_scene" in m.get("check", {})}
    if checked:
        lines += ["", "`flipray check` by scene (cuts in brackets)", "",
                  "| row | " + " | ".join(SCENE_KINDS) + " |", "|---|" + "---|" * len(SCENE_KINDS)]
        for name, by_scene in checked.items():
            for key in ("undecidable", "right_decided"):
                lines.append(f"| `{name}`: {key} | " +
                             " | ".join(cell(by_scene.get(k, {}).get(key)) for k in SCENE_KINDS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.capture_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset root with sidecars (flipray synth)")
    p.add_argument("--split", default="test", help="train | val | test | all (a held-out dataset, every clip)")
    p.add_argument("--model", action="append", required=True,
                   help="[NAME=]checkpoint.pt, run folder or models:/flipray-pretext/latest (repeat for several)")
    p.add_argument("--eval-windows", type=int, default=2)
    p.add_argument("--check-clips", type=int, default=0, help="clips cut to 3-s mp4s for flipray check (0 = none)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--frame-fit", choices=check.FRAME_FITS, default=check.CheckOptions.frame_fit,
                   help="flipray check --frame-fit: how wide videos become square frames")
    p.add_argument("--json-out", default=None)
    p.add_argument("--md-out", default=None)
    args = p.parse_args(argv)
    report = run(args.data, args.split, args.model, args.eval_windows, args.check_clips, args.threads,
                 args.frame_fit)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    if args.md_out:
        Path(args.md_out).write_text(markdown(report))
    print(markdown(report), file=sys.stderr)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
