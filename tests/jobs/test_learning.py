"""The learning proof in CI: bench/learning.py at two seeds, with half its questions.

It asserts the direction of the effect at each seed (the bench itself checks the issue's targets):
the cold start teaches the protocol (valid format on at least 90% of the questions), and RL from it
turns perception guesses into crop-and-measure calls, which raises perception accuracy, while no
family loses more than one question. A seed is a whole run (300 SFT steps, 8 GRPO steps, three
evaluations), about 8 minutes on an idle 2-core box, so two seeds are about a third of the CI run;
`python bench/learning.py --seeds 0,1,2,3,4` checks the spread over five (README, "Learning proof").
The recipe's 300 SFT steps are what the tool path needs (after 200 the crop-and-measure rollouts
were right 1 time in 6, and RL turned away from cropping).
"""

import json
import subprocess
import sys

import pytest

from tests.paths import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(4200)]
SEEDS = ("0", "1")


def test_rl_after_an_imperfect_cold_start_learns_to_crop_for_perception_at_two_seeds(tmp_path):
    command = [sys.executable, str(REPO / "bench" / "learning.py"), "--out", str(tmp_path), "--seeds", ",".join(SEEDS),
               "--sft-steps", "300", "--rl-steps", "8", "--eval-questions", "24"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=3900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1].removeprefix("RESULT "))["per_seed"]
    assert sorted(results) == sorted(SEEDS)
    for seed, result in results.items():
        before, sft, rl = (result["stages"][s] for s in ("before_sft", "after_sft", "after_rl"))
        assert before["format_rate"] < 0.5 and sft["format_rate"] >= 0.9, seed
        crop = result["right_tool_calls_per_trajectory"]
        assert crop["after_rl"]["perception"] > crop["after_sft"]["perception"], seed
        gain = result["gain_points_after_rl_vs_sft"]
        assert gain["perception"] > 0 and min(gain.values()) >= -100 / 8, (seed, gain)  # at most one question of 8 lost
        assert (tmp_path / f"seed-{seed}" / "eval_after_rl" / "plots" / "training_curves.png").is_file()


def test_smoke_shape_reports_every_stage_and_the_spread(tmp_path):
    command = [sys.executable, str(REPO / "bench" / "learning.py"), "--out", str(tmp_path), "--smoke"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1].removeprefix("RESULT "))
    assert result["smoke"] and result["seeds"] == [0] and set(result["per_seed_checks"]) == {"0"}
    assert set(result["per_seed"]["0"]["stages"]) == {"before_sft", "after_sft", "after_rl"}
    assert result["spread"]["after_sft.format_rate"]["min"] <= result["spread"]["after_sft.format_rate"]["max"]
    assert result["all_seeds_pass"] == all(result["per_seed_checks"]["0"].values())
