"""GRPO reinforcement learning of an agentic VLM (DeepEyesV2 recipe).

    python jobs/rl.py                                  # embedded default: tiny model, one CPU box
    python jobs/rl.py +experiment=deepeyesv2_7b_rl model.path=<cold-start checkpoint> data.train=<rl_train.jsonl> \
        data.image_index=<image_index.jsonl> reward.judge.model=<judge model> grpo.steps=<N>
                                                       # the paper's recipe on 8 GPU nodes (32B: deepeyesv2_32b_rl);
                                                       # it searches the web through SerpAPI: export SERPAPI_API_KEY
    python jobs/rl.py --cfg job                        # print the resolved config
    python jobs/rl.py cluster=slurm nodes=2            # submit to Slurm (submitit): one job, the launch plan on 2 nodes
    python jobs/rl.py cluster=slurm cluster.dry_run=true   # print the launch plan and sbatch script, submit nothing
"""

import hydra
from omegaconf import DictConfig

from deepeyes.config import register_configs

register_configs()


@hydra.main(config_path="../conf", config_name="rl", version_base=None)
def main(cfg: DictConfig) -> None:
    from deepeyes.launch import launch

    launch("rl", cfg)


if __name__ == "__main__":
    main()
