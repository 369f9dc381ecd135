"""Evaluate an agentic VLM on a benchmark with the training agent loop (tools on or off).

    python jobs/eval.py                                   # embedded default: tiny model, sample test split
    python jobs/eval.py ckpt=outputs/rl/.../checkpoints/step_000003 benchmark=vstar benchmark.path=VStarBench.tsv
    python jobs/eval.py -m benchmark=vstar,hrbench ...    # several benchmarks, one run each

Writes report.json, report.md, predictions.jsonl and plots/*.png into the run directory.
"""

import hydra
from omegaconf import DictConfig

from deepeyes.config import register_configs, to_object

register_configs()


@hydra.main(config_path="../conf", config_name="eval", version_base=None)
def main(cfg: DictConfig) -> None:
    from deepeyes.eval.evaluate import run_eval

    run_eval(to_object(cfg))


if __name__ == "__main__":
    main()
