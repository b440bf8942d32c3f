"""Evaluation by capture type: the pretext evaluation's per-capture accuracy, the capture groups read from the
sidecars, and the classical baselines of bench/capture_eval.py on clean rendered clips.

    .venv/bin/python -m pytest tests/test_capture_eval.py -x -q
"""
from __future__ import annotations

import pytest
import torch

from bench.capture_eval import baselines, picture_side, replay, scene_kind
from flipray import check
from flipray.config import load_config
from flipray.pretext.data import ClipDataset
from flipray.pretext.train import evaluate
from flipray.synth import scenes as synth


class SignOfAudio(torch.nn.Module):
    """A fixed classifier: logit = the batch's first audio sample (so the test sets every answer)."""

    def forward(self, video, audio):
        return audio[:, 0, 0]


def test_evaluate_reports_accuracy_per_capture_group():
    clips = ["a", "b", "c", "d", "e"]
    groups = {"a": "spaced", "b": "spaced", "c": "binaural", "d": "phone"}  # e: no sidecar -> unknown
    logits = torch.tensor([2.0, -1.0, 3.0, -2.0, 1.0])
    labels = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])  # right, wrong, right, right, wrong
    audio = torch.zeros(5, 2, 10)
    audio[:, 0, 0] = logits
    batch = {"video": torch.zeros(5, 1), "audio": audio, "label": labels, "clip_id": clips, "skipped": 0}
    res = evaluate(SignOfAudio(), [batch], "cpu", groups)
    assert res["acc"] == pytest.approx(3 / 5)
    assert res["acc_by_capture"] == {"binaural": {"acc": 1.0, "n": 1}, "phone": {"acc": 1.0, "n": 1},
                                     "spaced": {"acc": 0.5, "n": 2}, "unknown": {"acc": 0.0, "n": 1}}
    assert "acc_by_capture" not in evaluate(SignOfAudio(), [batch], "cpu")


def test_capture_group_of_sidecars():
    assert synth.capture_group({"render": {"capture": {"type": "near-coincident"}}}) == "spaced"
    assert synth.capture_group({"render": {"capture": {"type": "coincident", "layout": "ms"}}}) == "coincident"
    assert synth.capture_group({"render": {"head_radius_m": 0.08}}) == "binaural"  # rendered before capture setups
    assert synth.capture_group(None) == "unknown"


@pytest.fixture(scope="module")
def clean_pairs(tmp_path_factory):
    """Clean (no noise, no reverb, one source) clips from spaced pairs and coincident pairs."""
    root = tmp_path_factory.mktemp("pairs")
    synth.generate(root, 8, seed=2, workers=1, duration_s=3.0, size=64, noise=False, reverb_prob=0.0,
                   two_source_prob=0.0, max_distractors=0, mics=("spaced", "coincident"))
    return root


def test_dataset_groups_and_the_classical_baselines_on_clean_pairs(clean_pairs):
    cfg = load_config("demo", [f"data.root={clean_pairs}", "data.cache=false", "data.eval_windows=1"])
    ds = ClipDataset(cfg, None, train=False)
    groups = ds.capture_groups()
    assert set(groups.values()) == {"spaced", "coincident"} and len(groups) == 8
    table = baselines(ds)
    acc = {g: {k: v[0] / v[1] for k, v in d.items()} for g, d in table.items()}
    # the delay decides spaced pairs and says nothing on coincident ones (zero delay: a coin flip each, 0.5)
    assert acc["spaced"]["gcc-phat"] >= 0.9 and acc["coincident"]["gcc-phat"] == 0.5
    # the level difference decides most coincident pairs (a source near the centre can be outweighed by the
    # capsules' +-1.5 dB mismatch); omni spaced pairs have no level difference beyond that mismatch
    assert acc["coincident"]["level-difference"] >= acc["coincident"]["gcc-phat"] + 0.2
    assert acc["spaced"]["level-difference"] < acc["spaced"]["gcc-phat"]


def test_picture_side_is_the_loudest_sounding_objects():
    meta = {"objects": [{"sounding": True, "level_db": -8.0, "azimuth_deg": [20.0, 22.0, 24.0]},
                        {"sounding": True, "level_db": -2.0, "azimuth_deg": [-10.0, -12.0, -14.0]},
                        {"sounding": False, "level_db": None, "azimuth_deg": [30.0, 30.0, 30.0]}]}
    assert picture_side(meta, 0, 3) == -1
    assert picture_side({"objects": []}, 0, 3) == 0


def test_scene_kind_says_what_the_picture_asks():
    bell, shaker, rock = ({"sounding": True}, {"sounding": True}, {"sounding": False})
    assert scene_kind({"objects": [bell]}) == "one source"
    assert scene_kind({"objects": [bell, rock, rock]}) == "one source + silent objects"
    assert scene_kind({"objects": [bell, shaker]}) == scene_kind({"objects": [bell, shaker, rock]}) == "two sources"


def test_replay_recomputes_check_verdicts_under_other_options():
    """Stored cuts (window probabilities) decided again: a stricter margin turns a weak verdict undecidable."""
    cuts = [{"group": "spaced", "swapped": True, "error": None, "timeline": [[0.0, 0.58], [0.2, 0.6], [0.4, 0.57]]},
            {"group": "spaced", "swapped": False, "error": None, "timeline": [[0.0, 0.1], [0.2, 0.2], [0.4, None]]},
            {"group": "phone", "swapped": False, "error": None, "timeline": [[0.0, 0.7], [0.2, 0.8], [0.4, 0.9]]},
            {"group": "phone", "swapped": True, "error": "corrupt", "timeline": []}]
    loose = replay(cuts, check.CheckOptions(margin=0.05), 2.875)
    assert loose["spaced"]["right"] == {"acc": 1.0, "n": 2} and loose["spaced"]["undecidable"]["acc"] == 0.0
    assert loose["phone"]["right"] == {"acc": 0.0, "n": 1} and loose["phone"]["right_decided"]["n"] == 1
    assert loose["all"]["right"] == {"acc": 0.6667, "n": 3} and loose["all"]["undecidable"]["acc"] == 0.0
    strict = replay(cuts, check.CheckOptions(margin=0.15), 2.875)
    assert strict["spaced"]["undecidable"] == {"acc": 0.5, "n": 2} and strict["spaced"]["right_decided"]["n"] == 1
