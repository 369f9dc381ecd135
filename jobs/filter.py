"""Difficulty filter: k rollouts per question with the base model; keep the hard ones and split
them into RL data (solved with tools) and cold-start candidates (the rest).

    python jobs/filter.py                                 # embedded default: tiny model, sample train split
    python jobs/filter.py ckpt=/models/Qwen2.5-VL-7B-Instruct model=qwen2_5_vl_7b filter.input=rl_train.jsonl

Writes rl.jsonl, cold_start.jsonl, too_easy.jsonl, pass_counts.jsonl and summary.json.
"""

import hydra
from omegaconf import DictConfig

from deepeyes.config import register_configs, to_object

register_configs()


@hydra.main(config_path="../conf", config_name="filter", version_base=None)
def main(cfg: DictConfig) -> None:
    from deepeyes.eval.difficulty import run_filter

    run_filter(to_object(cfg))


if __name__ == "__main__":
    main()
